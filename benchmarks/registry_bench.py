"""What `ToolRegistry.execute` costs a call by itself: a tool that does nothing, called through
the registry (JSON parsing, the argument check, the context, the error handling, the run-time
stamp) and called directly, side by side in one run.

    python -m benchmarks.registry_bench [--calls 2000] [--rounds 9]

Rounds alternate the two ways, so a noisy moment of a shared machine touches both alike. Prints
the median microseconds per call of each and what the registry adds. The registry is on the
path of every call, Query and Execute: its cost is meant to stay in the tens of microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import count
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec

ARGUMENTS = '{"n": 1}'


async def _noop(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
    return ToolResult(output="ok")


NOOP = Tool(
    spec=ToolSpec(
        name="noop",
        description="Does nothing.",
        parameters={"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False},
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_noop,
)


async def _through_registry(registry: ToolRegistry, workspace: Path, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await registry.execute("noop", workspace, ARGUMENTS)
    return (time.perf_counter() - started) / calls


async def _direct(context: ToolContext, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await _noop(context, {"n": 1})
    return (time.perf_counter() - started) / calls


async def measure(calls: int, rounds: int) -> tuple[list[float], list[float]]:
    registry = ToolRegistry([NOOP])
    with tempfile.TemporaryDirectory() as directory:
        workspace = Path(directory)
        context = ToolContext(workspace=workspace)
        await _through_registry(registry, workspace, calls)  # warm-up: caches, validators
        via, direct = [], []
        for _ in range(rounds):
            via.append(await _through_registry(registry, workspace, calls))
            direct.append(await _direct(context, calls))
    return via, direct


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=count, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=count, default=9)
    args = parser.parse_args(argv)
    via, direct = asyncio.run(measure(args.calls, args.rounds))
    via_us, direct_us = statistics.median(via) * 1e6, statistics.median(direct) * 1e6
    print(f"registry dispatch ({args.calls} calls x {args.rounds} rounds, medians):")
    print(f"  through ToolRegistry.execute: {via_us:8.1f} us/call")
    print(f"  the tool called directly:     {direct_us:8.1f} us/call")
    print(f"  the registry adds:            {via_us - direct_us:8.1f} us/call ({via_us / direct_us:.1f}x)")


if __name__ == "__main__":
    main()
