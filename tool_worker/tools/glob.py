"""glob: find files by name pattern, newest first (Query lane)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from typing import Any

from tool_worker import effects
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.globs import glob_to_regex
from tool_worker.tools.rg import left_out, run_rg, search_location

MAX_RESULTS = 100
# rg walks with one thread fewer than there are cores: the stats of the paths it prints run
# meanwhile on the core left over (os.stat releases the GIL).
_WALK_THREADS = max(1, (os.cpu_count() or 2) - 1)


def _stamp(directory: str, matches: Callable[[str], object], raw_names: list[bytes]) -> list[tuple[float, str]]:
    """(-mtime, name) for each name that matches: once sorted, newest first and ties in path order."""
    stamped = []
    # Stats relative to a descriptor of the directory: no path joins, fewer lookups.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for raw in raw_names:
            name = raw.decode("utf-8", "surrogateescape")
            if not matches(name):
                continue
            try:
                mtime = os.stat(name, dir_fd=dir_fd).st_mtime
            except OSError:
                # Deleted between the walk and now: sort it last rather than fail the call.
                mtime = 0.0
            stamped.append((-mtime, name))
    finally:
        os.close(dir_fd)
    return stamped


class _Stamper:
    """Matches and stats the paths rg prints while rg is still walking.

    Each chunk of rg's output becomes a batch for the default thread pool, so the stats
    (thousands of syscalls) overlap the walk instead of following it, and the event loop stays
    free.
    """

    def __init__(self, directory: str, pattern: str) -> None:
        self._directory = directory
        self._matches = glob_to_regex(pattern).fullmatch
        self._partial = b""
        self._batches: list[asyncio.Future[list[tuple[float, str]]]] = []
        self._loop = asyncio.get_running_loop()

    def feed(self, chunk: bytes) -> None:
        *complete, self._partial = (self._partial + chunk).split(b"\0")
        if complete:
            batch = self._loop.run_in_executor(None, _stamp, self._directory, self._matches, complete)
            self._batches.append(batch)

    async def newest_first(self) -> list[tuple[float, str]]:
        stamped = [pair for batch in await asyncio.gather(*self._batches) for pair in batch]
        stamped.sort()
        return stamped


def _printable(name: str) -> str:
    """A path as text the wire can carry: undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    root = workspace_root(ctx.workspace)
    shown_dir = args.get("path", ".")
    target = resolve_in_workspace(ctx.workspace, shown_dir)
    ctx.check_readable(target, shown_dir)
    if not target.is_dir():
        raise ToolFailure(f"not a directory: {shown_dir}")
    cwd, _, prefix = search_location(root, target)
    if args["pattern"].startswith("!"):
        raise ToolFailure("a glob pattern cannot start with '!' (negation)", ErrorKind.INVALID_ARGUMENTS)
    try:
        stamper = _Stamper(str(cwd), args["pattern"])
    except re.error as exc:
        raise ToolFailure(f"{args['pattern']!r} is not a glob: {exc}", ErrorKind.INVALID_ARGUMENTS) from None
    out = await run_rg(
        ["--files", "--null", f"--threads={_WALK_THREADS}"], cwd, ctx.sandbox.read_only, on_chunk=stamper.feed
    )
    out.check("glob")
    stamped = await stamper.newest_first()
    hidden = 0
    if ctx.denied:
        kept = [(stamp, name) for stamp, name in stamped if not ctx.hides(prefix + name)]
        hidden, stamped = len(stamped) - len(kept), kept
    notice = left_out(out, hidden)
    if not stamped:
        return ToolResult(output="\n".join([f"No files match {args['pattern']!r} in {shown_dir}", *notice]))
    lines = [prefix + _printable(name) for _, name in stamped[:MAX_RESULTS]]
    truncated = len(stamped) > MAX_RESULTS or out.overflowed
    if truncated:
        lines.append(
            f"[showing the {MAX_RESULTS} newest of {len(stamped)}{'+' if out.overflowed else ''} matching "
            "files; use a narrower pattern or path to see the others]"
        )
    return ToolResult(output="\n".join(lines + notice), truncated=truncated, metadata={"matches": len(stamped)})


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
    effects=effects.reads(("path", "."), pattern_argument="pattern"),
)
