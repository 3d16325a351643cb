"""A tool plugin for the contract tests: `fail_as` ends with the ErrorKind it is asked for, so
every kind can be sent from a real worker process to a real client."""

from __future__ import annotations

from typing import Any

from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolResult, ToolSpec


async def _fail_as(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    kind = ErrorKind(args["kind"])
    return ToolResult.error(kind, f"failed as {kind.value}", exit_code=len(kind.value))


TOOLS = [
    Tool(
        spec=ToolSpec(
            name="fail_as",
            description="Fail with the given error kind.",
            parameters={
                "type": "object",
                "properties": {"kind": {"type": "string", "enum": [kind.value for kind in ErrorKind]}},
                "required": ["kind"],
                "additionalProperties": False,
            },
            lane=Lane.QUERY,
            idempotent=True,
        ),
        run=_fail_as,
    )
]
