"""glob: find files by name pattern, newest first (Query lane)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.rg import run_rg, search_location

MAX_RESULTS = 100


def _newest_first(directory: str, names: list[bytes]) -> list[tuple[float, bytes]]:
    """(-mtime, name) pairs, sorted: newest first, ties by path so the order is always the same."""
    stamped = []
    # Relative stats against one directory descriptor: no path joins, fewer lookups.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            try:
                mtime = os.stat(name, dir_fd=dir_fd).st_mtime
            except OSError:
                # Deleted between the walk and now: sort it last rather than fail the call.
                mtime = 0.0
            stamped.append((-mtime, name))
    finally:
        os.close(dir_fd)
    stamped.sort()
    return stamped


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    root = workspace_root(ctx.workspace)
    shown_dir = args.get("path", ".")
    target = resolve_in_workspace(ctx.workspace, shown_dir)
    if not target.is_dir():
        raise ToolFailure(f"not a directory: {shown_dir}")
    cwd, _, prefix = search_location(root, target)
    out = await run_rg(["--files", "--null", "--glob", args["pattern"]], cwd)
    if out.returncode == 2 and not out.stdout:
        raise ToolFailure(f"glob failed: {out.stderr}")
    # Thousands of stats would stall the event loop; a thread keeps it serving other calls.
    stamped = await asyncio.to_thread(_newest_first, str(cwd), out.stdout.split(b"\0")[:-1])
    if not stamped:
        return ToolResult(output=f"No files match {args['pattern']!r} in {shown_dir}")
    lines = [prefix + name.decode("utf-8", "replace") for _, name in stamped[:MAX_RESULTS]]
    truncated = len(stamped) > MAX_RESULTS or out.overflowed
    if truncated:
        lines.append(
            f"[showing the {MAX_RESULTS} newest of {len(stamped)}{'+' if out.overflowed else ''} matching "
            "files; use a narrower pattern or path to see the others]"
        )
    return ToolResult(output="\n".join(lines), truncated=truncated, metadata={"matches": len(stamped)})


TOOL = Tool(
    spec=ToolSpec(
        name="glob",
        description=(
            "Find files whose path matches a glob pattern, such as `*.py` (any depth), "
            "`src/**/*.ts` or `tests/test_*.py` (relative to path). Lists the most recently "
            f"modified first, at most {MAX_RESULTS}. Files ignored by .gitignore and hidden files "
            "(names starting with a dot) are skipped. Paths in the answer are relative to the "
            "workspace root. To search file contents use grep; to find code by meaning use search."
        ),
        parameters={
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "minLength": 1, "description": "Glob pattern to match."},
                "path": {
                    "type": "string",
                    "description": "Directory to search in (default: the workspace root).",
                },
            },
            "required": ["pattern"],
            "additionalProperties": False,
        },
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_run,
)
