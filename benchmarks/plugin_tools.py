"""Tools with a known cost, for benchmarks and tests: `--tools benchmarks.plugin_tools`.

- `noop`: returns at once (measures the dispatch path alone);
- `sleep`: waits `ms` milliseconds without using a core (stands in for GPU inference or remote
  storage: a fixed service time);
- `sleep_process`: runs `sleep` as a child process (to see that a cancelled call's process dies,
  or, with `timeout_ms`, that a tool's own timeout works on a worker);
- `gpu_info`: only routed to workers labelled gpu=true; says which process ran it;
- `bulky`: returns `chars` copies of `char` as its output and a metadata string of
  `metadata_chars` characters (results bigger than the wire or the hub keeps).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from typing import Any

from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec
from tool_worker.tools.process import run_command

MAX_SLEEP_MS = 600_000


async def _noop(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
    return ToolResult(output="ok")


_running_sleeps = 0


async def _sleep(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # Reports how many sleeps ran at once in this process, so tests can measure worker slots.
    global _running_sleeps
    _running_sleeps += 1
    concurrent = _running_sleeps
    try:
        await asyncio.sleep(args["ms"] / 1000)
    finally:
        _running_sleeps -= 1
    return ToolResult(
        output=f"slept {args['ms']} ms in pid {os.getpid()}", metadata={"pid": os.getpid(), "concurrent": concurrent}
    )


async def _sleep_process(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # The sleep is named `mark` (its argv[0]), so a test finds it on the host whatever PID
    # namespace the sandbox gives it, and can check that it is gone.
    script = f"exec -a {shlex.quote(args['mark'])} sleep {args['ms'] / 1000}"
    return await run_command(["bash", "-c", script], ctx, timeout_ms=args.get("timeout_ms", MAX_SLEEP_MS))


async def _gpu_info(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
    return ToolResult(output=f"gpu worker pid {os.getpid()}", metadata={"pid": os.getpid()})


async def _bulky(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    metadata = {"filler": "m" * args["metadata_chars"]} if args.get("metadata_chars") else {}
    return ToolResult(output=args.get("char", "x") * args["chars"], metadata=metadata)


MAX_BULKY_CHARS = 64 * 1024 * 1024

_SLEEP_SCHEMA = {
    "type": "object",
    "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}},
    "required": ["ms"],
    "additionalProperties": False,
}

TOOLS = [
    Tool(ToolSpec("noop", "Does nothing and returns ok.", {"type": "object"}, Lane.QUERY, True), _noop),
    Tool(ToolSpec("sleep", "Waits `ms` milliseconds, then returns.", _SLEEP_SCHEMA, Lane.QUERY, True), _sleep),
    Tool(
        ToolSpec(
            "sleep_process",
            "Runs `sleep` in a child process for `ms` milliseconds, named `mark` (its argv[0]).",
            {
                "type": "object",
                "properties": {
                    "ms": _SLEEP_SCHEMA["properties"]["ms"],
                    "mark": {"type": "string", "minLength": 1},
                    "timeout_ms": {"type": "integer", "minimum": 1, "maximum": MAX_SLEEP_MS},
                },
                "required": ["ms", "mark"],
            },
            Lane.QUERY,
            True,
        ),
        _sleep_process,
    ),
    Tool(
        ToolSpec(
            "gpu_info",
            "Reports the GPU worker that ran it.",
            {"type": "object"},
            Lane.QUERY,
            True,
            required_labels={"gpu": "true"},
        ),
        _gpu_info,
    ),
    Tool(
        ToolSpec(
            "bulky",
            "Returns `chars` copies of `char` and `metadata_chars` characters of metadata.",
            {
                "type": "object",
                "properties": {
                    "chars": {"type": "integer", "minimum": 0, "maximum": MAX_BULKY_CHARS},
                    "char": {"type": "string", "minLength": 1, "maxLength": 1},
                    "metadata_chars": {"type": "integer", "minimum": 0, "maximum": MAX_BULKY_CHARS},
                },
                "required": ["chars"],
                "additionalProperties": False,
            },
            Lane.QUERY,
            True,
        ),
        _bulky,
    ),
]
