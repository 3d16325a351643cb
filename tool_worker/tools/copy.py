"""copy: copy a file or a directory tree (Execute lane)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from tool_worker.confinement.protected import refuse_protected
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import check_destination, remove_existing, source_destination_schema


def _copy(source: Path, destination: Path, shown: tuple[str, str], overwrite: bool) -> ToolResult:
    if not source.exists():
        raise ToolFailure(f"source not found: {shown[0]}")
    check_destination(source, destination, shown[1], overwrite)
    if destination.exists() or destination.is_symlink():
        remove_existing(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        # Links inside the tree are copied as links: following them could read outside the workspace.
        shutil.copytree(source, destination, symlinks=True)
        return ToolResult(output=f"Copied directory {shown[0]} to {shown[1]}")
    shutil.copy2(source, destination)
    return ToolResult(output=f"Copied {shown[0]} to {shown[1]}")


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # The source is read, so it resolves through symlinks (and must land inside); the
    # destination names the new entry itself.
    source = resolve_in_workspace(ctx.workspace, args["source"])
    destination = resolve_in_workspace(ctx.workspace, args["destination"], follow_final_symlink=False)
    refuse_protected(ctx, "copy", (destination, args["destination"]))
    shown = (args["source"], args["destination"])
    try:
        return await asyncio.to_thread(_copy, source, destination, shown, args.get("overwrite", False))
    except OSError as exc:
        raise ToolFailure(f"cannot copy {shown[0]} to {shown[1]}: {exc.strerror or exc}") from exc


TOOL = Tool(
    spec=ToolSpec(
        name="copy",
        description=(
            "Copy a file, or a directory with everything inside it. destination is the path of the "
            "copy itself (not a directory to copy into); missing parent directories are created. "
            "An existing destination is an error unless overwrite=true, which replaces it. "
            "Symlinks inside a copied directory stay symlinks. Paths are relative to the workspace root."
        ),
        parameters=source_destination_schema("File or directory to copy.", "Path of the copy."),
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
)
