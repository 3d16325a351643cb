"""ls: list one directory, directories first (Query lane)."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import threading
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.denied import relative_to_root
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import check_stop, hidden_notice, run_stoppable

MAX_ENTRIES = 1000


def _list(ctx: ToolContext, directory: Path, shown: str, ignore: list[str], stop: threading.Event) -> ToolResult:
    # Entries are checked against the policy by their path relative to the workspace root.
    base = relative_to_root(ctx.root, str(directory)) or "."
    patterns = [_name_pattern(pattern) for pattern in ignore]
    hidden = 0
    try:
        with os.scandir(directory) as scan:
            entries = []
            for entry in scan:
                check_stop(stop)
                if any(fnmatch.fnmatchcase(entry.name, pattern) and (not directories_only or entry.is_dir())
                       for pattern, directories_only in patterns):
                    continue
                if ctx.hides(posixpath.join(base, entry.name)):
                    hidden += 1
                    continue
                entries.append((entry.name, entry.is_dir()))
    except FileNotFoundError as exc:
        raise ToolFailure(f"directory not found: {shown}") from exc
    except NotADirectoryError as exc:
        raise ToolFailure(f"{shown} is a file, not a directory; use read to see it") from exc
    except PermissionError as exc:
        raise ToolFailure(f"permission denied listing {shown}") from exc
    dirs = sorted(name + "/" for name, is_dir in entries if is_dir)
    files = sorted(name for name, is_dir in entries if not is_dir)
    listing = dirs + files
    notice = [hidden_notice(hidden)] if hidden else []
    if not listing:
        return ToolResult(
            output="\n".join([f"{shown} is empty" + (" (after ignore patterns)" if ignore else ""), *notice])
        )
    lines = listing[:MAX_ENTRIES]
    truncated = len(listing) > MAX_ENTRIES
    if truncated:
        lines.append(f"[showing {MAX_ENTRIES} of {len(listing)} entries; use glob or ignore patterns to narrow it]")
    return ToolResult(output="\n".join(lines + notice), truncated=truncated, metadata={"entries": len(listing)})


def _name_pattern(pattern: str) -> tuple[str, bool]:
    """A pattern as the names of one directory are matched with it, and whether it matches
    directories only. Written as ls shows a directory (`node_modules/`) or as gitignore does
    (`**/node_modules`), it matched no name, and left nothing out."""
    directories_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    while pattern.startswith("**/"):
        pattern = pattern[3:]
    return pattern, directories_only


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    shown = args.get("path", ".")
    directory = resolve_in_workspace(ctx.workspace, shown)
    ctx.check_readable(directory, shown)
    return await run_stoppable(_list, ctx, directory, shown, args.get("ignore", []))


TOOL = Tool(
    spec=ToolSpec(
        name="ls",
        description=(
            "List the entries of one directory (not recursive): directories first, each ending "
            "with `/`, then files, each group sorted by name. Hidden entries are included and "
            f".gitignore is not applied. At most {MAX_ENTRIES} entries. For a recursive listing use "
            "list_files; to find files by name use glob."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {
                    "type": "string",
                    "description": "Directory to list, relative to the workspace root (default: the root).",
                },
                "ignore": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": (
                        "Glob patterns of entry names to leave out, such as `*.pyc` or `node_modules`; "
                        "one ending with `/` leaves out directories only."
                    ),
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
