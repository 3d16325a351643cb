"""A tool plugin whose tools' declarations fail, as a third party's may: `effects` raises (a Query
and an Execute tool) or returns no Effects, `cheaper_here` raises. Each tool's run is sound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec


async def _run(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
    return ToolResult(output="ran")


def _raises(_arguments: Any) -> Any:
    raise KeyError("path")


def _not_effects(_arguments: Any) -> Any:
    return ["a.txt"]


def _cheaper_raises(_workspace: Path, _arguments: dict[str, Any]) -> bool:
    raise KeyError("path")


def _spec(name: str, lane: Lane = Lane.QUERY) -> ToolSpec:
    return ToolSpec(name, f"{name}.", {"type": "object"}, lane, lane is Lane.QUERY)


TOOLS = [
    Tool(_spec("effects_raise"), _run, effects=_raises),
    Tool(_spec("effects_not_effects"), _run, effects=_not_effects),
    Tool(_spec("execute_effects_raise", Lane.EXECUTE), _run, effects=_raises),
    Tool(_spec("cheaper_raises"), _run, cheaper_here=_cheaper_raises),
]
