"""A tool plugin for the registry tests: loaded with ToolRegistry.load_module."""

from __future__ import annotations

from typing import Any

from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec


async def _shout(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    return ToolResult(output=args["text"].upper())


TOOLS = [
    Tool(
        spec=ToolSpec(
            name="shout",
            description="Upper-case a text.",
            parameters={
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
                "additionalProperties": False,
            },
            lane=Lane.QUERY,
            idempotent=True,
        ),
        run=_shout,
    )
]
