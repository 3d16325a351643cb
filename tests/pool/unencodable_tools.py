"""A tool module (`codelane worker --tools tests.pool.unencodable_tools`) whose results the wire
cannot carry as they are: a metadata key JSON has no type for, an exit code past 32 bits."""

from tool_worker.tools.base import Lane, Tool, ToolResult, ToolSpec


async def _tuple_key(_ctx, _args) -> ToolResult:
    return ToolResult(output="looks fine", metadata={("a", "b"): 1})


async def _huge_exit_code(_ctx, _args) -> ToolResult:
    return ToolResult(output="looks fine", exit_code=2**40)


TOOLS = [
    Tool(ToolSpec("tuple_key", "metadata with a tuple key", {"type": "object"}, Lane.QUERY, True), _tuple_key),
    Tool(ToolSpec("huge_exit_code", "an exit code past 32 bits", {"type": "object"}, Lane.QUERY, True),
         _huge_exit_code),
]
