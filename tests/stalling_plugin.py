"""A tool plugin for the deadline tests: `stall` says the deadline it was given (call_deadline, in
the file `record`), then runs until the file `until` appears, as a long read would."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.polling import poll_until
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec, call_deadline

# A bound on the stall, so that a test failing leaves no call running for long.
_LONGEST = 60.0


async def _stall(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    said = {"deadline": call_deadline.get(), "started": asyncio.get_running_loop().time()}
    await asyncio.to_thread(Path(args["record"]).write_text, json.dumps(said), encoding="utf-8")
    until = Path(args["until"])
    await poll_until(until.exists, what=f"{until} to appear", within=_LONGEST)
    return ToolResult(output="released")


TOOLS = [
    Tool(
        spec=ToolSpec(
            name="stall",
            description="Run until a file appears.",
            parameters={
                "type": "object",
                "properties": {"record": {"type": "string"}, "until": {"type": "string"}},
                "required": ["record", "until"],
                "additionalProperties": False,
            },
            lane=Lane.QUERY,
            idempotent=True,
        ),
        run=_stall,
    )
]
