"""delete: remove a file, a symlink, or (with recursive=true) a directory (Execute lane)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.confinement.protected import refuse_protected
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import remove_tree, run_stoppable


def _delete(target: Path, shown: str, recursive: bool, stop: threading.Event) -> ToolResult:
    if target.is_symlink() or target.is_file():
        target.unlink()
        return ToolResult(output=f"Deleted {shown}")
    if target.is_dir():
        if not recursive:
            raise ToolFailure(f"{shown} is a directory; set recursive=true to delete it with everything inside")
        removed = [0]
        try:
            remove_tree(target, stop, removed)
        except OSError as exc:
            if not removed[0]:
                raise
            # "cannot delete" alone read as if nothing had gone.
            raise ToolFailure(
                f"cannot delete {shown} whole: {exc.strerror or exc}; {removed[0]} entries inside it were deleted "
                "before that, the rest is still there"
            ) from exc
        return ToolResult(output=f"Deleted directory {shown} and its contents")
    if not target.exists():
        raise ToolFailure(f"nothing to delete: {shown} does not exist")
    target.unlink()
    return ToolResult(output=f"Deleted {shown}")


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # The link itself, not its target, is what deleting a symlink removes.
    target = resolve_in_workspace(ctx.workspace, args["path"], follow_final_symlink=False)
    if target == workspace_root(ctx.workspace):
        raise ToolFailure("refusing to delete the workspace root")
    refuse_protected(ctx, "delete", (target, args["path"]))
    try:
        return await run_stoppable(_delete, target, args["path"], args.get("recursive", False))
    except OSError as exc:
        raise ToolFailure(f"cannot delete {args['path']}: {exc.strerror or exc}") from exc


TOOL = Tool(
    spec=ToolSpec(
        name="delete",
        description=(
            "Delete a file or symlink (the link itself, not what it points to). A directory is "
            "deleted only with recursive=true, and then with everything inside it. Paths are "
            "relative to the workspace root."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "description": "File or directory to delete."},
                "recursive": {
                    "type": "boolean",
                    "description": "Required to delete a directory (default false).",
                },
            },
            "required": ["path"],
            "additionalProperties": False,
        },
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
    effects=effects.writes("path"),
)
