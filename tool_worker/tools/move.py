"""move: rename or move a file or directory (Execute lane)."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.confinement.protected import refuse_protected
from tool_worker.denied import relative_to_root
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import (
    check_destination,
    check_stop,
    new_parents,
    put_in_place,
    remove_existing,
    run_stoppable,
    source_destination_schema,
)


def _move(
    ctx: ToolContext, source: Path, destination: Path, shown: tuple[str, str], overwrite: bool, stop: threading.Event
) -> ToolResult:
    if not source.exists() and not source.is_symlink():
        raise ToolFailure(f"source not found: {shown[0]}")
    if ctx.denied and source.is_dir() and not source.is_symlink():
        _refuse_denied_inside(ctx, source, shown[0])
    check_destination(source, destination, shown[1], overwrite)
    with new_parents(destination, shown[1]):
        _move_into_place(source, destination, shown, overwrite, stop)
    return ToolResult(output=f"Moved {shown[0]} to {shown[1]}")


def _move_into_place(
    source: Path, destination: Path, shown: tuple[str, str], overwrite: bool, stop: threading.Event
) -> None:
    check_stop(stop)
    try:
        # One rename, the old destination swapped out in the same step: it was removed first, so
        # a move stopped (or failing) after that left it half deleted or gone and the source
        # where it was; and shutil.move put the source inside a directory that appeared since the
        # check, or wrote over a file.
        put_in_place(source, destination, overwrite, shown[1])
    except FileExistsError:
        if overwrite:
            raise
        raise ToolFailure(f"destination {shown[1]} already exists (it appeared meanwhile); "
                          "set overwrite=true to replace it") from None
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Another file system (one mounted inside the workspace): copied and removed, as mv does.
        if destination.exists() or destination.is_symlink():
            remove_existing(destination, stop)
        shutil.move(source, destination)


def _refuse_denied_inside(ctx: ToolContext, directory: Path, shown: str) -> None:
    """PERMISSION_DENIED when the directory holds a path the session may not read: moved under
    another name, it would be read there (copy leaves such paths out; a move cannot)."""
    for parent, names, files in os.walk(directory):
        for name in (*names, *files):
            relative = relative_to_root(ctx.root, os.path.join(parent, name))
            if relative is not None and ctx.hides(relative):
                raise ToolFailure(
                    f"move was not run: {shown} holds paths this session's permission policy denies reading, "
                    "which the move would put under another name",
                    ErrorKind.PERMISSION_DENIED,
                )


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # Both ends name entries, not what symlinks point to: moving a link moves the link.
    source = resolve_in_workspace(ctx.workspace, args["source"], follow_final_symlink=False)
    destination = resolve_in_workspace(ctx.workspace, args["destination"], follow_final_symlink=False)
    if source == workspace_root(ctx.workspace):
        raise ToolFailure("refusing to move the workspace root")
    # A moved file is read under its new name: the source must be readable, as copy's is.
    ctx.check_readable(source, args["source"])
    refuse_protected(ctx, "move", (source, args["source"]), (destination, args["destination"]))
    shown = (args["source"], args["destination"])
    try:
        return await run_stoppable(_move, ctx, source, destination, shown, args.get("overwrite", False))
    except OSError as exc:
        raise ToolFailure(f"cannot move {shown[0]} to {shown[1]}: {exc.strerror or exc}") from exc


TOOL = Tool(
    spec=ToolSpec(
        name="move",
        description=(
            "Move or rename a file or directory. destination is the new path itself (not a "
            "directory to move into); missing parent directories are created. An existing "
            "destination is an error unless overwrite=true, which replaces it (a directory with "
            "all its contents). Paths are relative to the workspace root."
        ),
        parameters=source_destination_schema("What to move.", "Its new path."),
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
    effects=effects.writes("source", "destination"),
)
