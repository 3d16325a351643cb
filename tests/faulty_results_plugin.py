"""A tool plugin whose tools return what a ToolResult must not hold, as a third party's tool may
by mistake: each tool is named after its fault. `kind_as_text` returns a sound result whose error
kind is given as its text ("path_escape"), which is that kind. `exits` calls sys.exit, as a
library's command-line code may."""

from __future__ import annotations

import sys
from typing import Any

from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec

FAULTS: dict[str, tuple[Any, str]] = {
    # name: (what the tool returns, what the error result says of it)
    "not_a_result": ("just text", "a str, not a ToolResult"),
    "bytes_output": (ToolResult(output=b"\xff\xfe"), "output is a bytes, not a str"),  # type: ignore[arg-type]
    "unknown_kind": (ToolResult("no", is_error=True, error_kind="weird"), "error_kind 'weird' is not an ErrorKind"),  # type: ignore[arg-type]
    "big_exit_code": (ToolResult("done", exit_code=2**40), "exit_code 1099511627776 is not a 32-bit int"),
    "tuple_key": (ToolResult("done", metadata={("a", "b"): 1}), "metadata JSON cannot write"),  # type: ignore[dict-item]
    "list_metadata": (ToolResult("done", metadata=[1, 2]), "metadata is a list, not a dict"),  # type: ignore[arg-type]
}


def _returning(value: Any) -> Any:
    async def run(_ctx: ToolContext, _args: dict[str, Any]) -> Any:
        return value

    return run


def _tool(name: str, value: Any) -> Tool:
    return Tool(ToolSpec(name, f"Returns {name}.", {"type": "object"}, Lane.QUERY, True), _returning(value))


async def _exits(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
    sys.exit("usage: lint [FILE]")


TOOLS = [_tool(name, value) for name, (value, _) in FAULTS.items()] + [
    _tool("kind_as_text", ToolResult("outside", is_error=True, error_kind="path_escape")),  # type: ignore[arg-type]
    Tool(ToolSpec("exits", "Calls sys.exit.", {"type": "object"}, Lane.QUERY, True), _exits),
]
