"""bash: run a shell command in the workspace (Execute lane)."""

from __future__ import annotations

import shutil
from typing import Any

from tool_worker.tools import process
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec

# A login-free, rc-free shell; /bin/sh where bash is missing (slim containers).
_SHELL = shutil.which("bash") or "/bin/sh"


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    timeout_ms = args.get("timeout", process.DEFAULT_TIMEOUT_MS)
    process.check_argument(args["command"], "the command")  # named as the model knows it
    return await process.run_command([_SHELL, "-c", args["command"]], ctx, timeout_ms)


TOOL = Tool(
    spec=ToolSpec(
        name="bash",
        description=(
            "Run a shell command with bash -c, in the workspace directory, and return its combined "
            "stdout and stderr.\n"
            "- No input is available (stdin is empty): do not run interactive programs.\n"
            f"- Timeout in milliseconds: default {process.DEFAULT_TIMEOUT_MS}, max "
            f"{process.MAX_TIMEOUT_MS}; on timeout the command and every process it started are "
            "killed and the output so far is returned.\n"
            "- Processes left running in the background are killed when the command finishes.\n"
            f"- Output over {process.MAX_OUTPUT_CHARS} characters is cut from the middle; redirect "
            "large output to a file and grep or read it instead.\n"
            "- A non-zero exit code makes the result an error; the code is shown at the end.\n"
            f"{process.SANDBOX_NOTE}\n"
            "- Prefer the read, grep, glob, ls, write and edit tools for files."
        ),
        parameters={
            "type": "object",
            "properties": {
                "command": {
                    "type": "string",
                    "minLength": 1,
                    "description": f"The shell command to run, at most {process.MAX_ARGUMENT_BYTES:,} bytes (UTF-8): "
                    "write a longer script to a file and run that.",
                },
                "timeout": process.TIMEOUT_SCHEMA,
            },
            "required": ["command"],
            "additionalProperties": False,
        },
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
)
