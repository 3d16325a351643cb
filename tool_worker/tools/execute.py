"""execute: run a program from an argument list, without a shell (Execute lane)."""

from __future__ import annotations

from typing import Any

from tool_worker.tools import process
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    timeout_ms = args.get("timeout", process.DEFAULT_TIMEOUT_MS)
    return await process.run_command(args["argv"], ctx, timeout_ms)


TOOL = Tool(
    spec=ToolSpec(
        name="execute",
        description=(
            "Run a program directly from an argument list (no shell: no quoting, globbing, pipes or "
            "redirection), in the workspace directory, and return its combined stdout and stderr. "
            'Example: {"argv": ["pytest", "-q", "tests/test_x.py"]}.\n'
            f"- Timeout in milliseconds: default {process.DEFAULT_TIMEOUT_MS}, max "
            f"{process.MAX_TIMEOUT_MS}; on timeout the program and its children are killed.\n"
            f"- Output over {process.MAX_OUTPUT_CHARS} characters is cut from the middle.\n"
            "- A non-zero exit code makes the result an error; the code is shown at the end.\n"
            f"{process.SANDBOX_NOTE}"
        ),
        parameters={
            "type": "object",
            "properties": {
                "argv": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "description": "Program and its arguments; the program is looked up on PATH.",
                },
                "timeout": process.TIMEOUT_SCHEMA,
            },
            "required": ["argv"],
            "additionalProperties": False,
        },
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
)
