"""list_files: every file under a directory, recursively, honouring .gitignore (Query lane)."""

from __future__ import annotations

from typing import Any

from tool_worker import effects
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.rg import RgOutput, answer_of, left_out, run_rg, search_location

MAX_ENTRIES = 1000
# rg refuses numbers past its integers; no path is nested this deep (PATH_MAX is 4096 bytes).
MAX_DEPTH = 4096


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    shown = args.get("path", ".")
    target = resolve_in_workspace(ctx.workspace, shown)
    ctx.check_readable(target, shown)
    if not target.is_dir():
        raise ToolFailure(f"not a directory: {shown}")
    cwd, _, prefix = search_location(workspace_root(ctx.workspace), target)
    rg_args = ["--files", "--null"]
    if "max_depth" in args:
        rg_args += ["--max-depth", str(args["max_depth"])]
    out = await run_rg(rg_args, cwd, ctx.sandbox.read_only)
    out.check(f"listing {shown}")
    return await answer_of(out, lambda: _answer(ctx, out, prefix, shown))


def _answer(ctx: ToolContext, out: RgOutput, prefix: str, shown: str) -> ToolResult:
    """The sorted listing from rg's, with what was left out."""
    paths = [prefix + name.decode("utf-8", "replace") for name in sorted(out.stdout.split(b"\0")[:-1])]
    hidden = 0
    if ctx.denied:
        kept = [path for path in paths if not ctx.hides(path)]
        hidden, paths = len(paths) - len(kept), kept
    notice = left_out(out, hidden)
    if not paths:
        return ToolResult(output="\n".join([f"No files under {shown} (after .gitignore)", *notice]))
    lines = paths[:MAX_ENTRIES]
    truncated = len(paths) > MAX_ENTRIES or out.overflowed
    if truncated:
        lines.append(
            f"[showing the first {MAX_ENTRIES} of {len(paths)}{'+' if out.overflowed else ''} files; "
            "list a subdirectory, lower max_depth, or use glob to narrow it]"
        )
    return ToolResult(output="\n".join(lines + notice), truncated=truncated, metadata={"files": len(paths)})


TOOL = Tool(
    spec=ToolSpec(
        name="list_files",
        description=(
            "List every file under a directory, recursively, sorted by path. Files ignored by "
            ".gitignore and hidden files (names starting with a dot) are skipped. max_depth 1 lists "
            f"only the directory's own files. At most {MAX_ENTRIES} paths, relative to the "
            "workspace root. To see one directory with its subdirectories, use ls."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {
                    "type": "string",
                    "description": "Directory to list, relative to the workspace root (default: the root).",
                },
                "max_depth": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_DEPTH,
                    "description": "How many directory levels to descend (default: no limit).",
                },
            },
            "additionalProperties": False,
        },
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_run,
    effects=effects.reads(("path", ".")),
)
