"""Confine tool paths to a workspace.

Paths are compared after resolving every symlink, of the workspace and of the target, so a
link inside the workspace that points outside is an escape, and one that points inside is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from tool_worker.tools.base import ErrorKind, ToolFailure


def workspace_root(workspace: Path) -> Path:
    """The workspace with every symlink resolved: what resolved targets are compared against."""
    return Path(os.path.realpath(workspace))


def resolve_in_workspace(workspace: Path, user_path: str, *, follow_final_symlink: bool = True) -> Path:
    """Resolve `user_path` (relative to the workspace, or absolute) to a real path inside it.

    With `follow_final_symlink=False` the last component is kept as named rather than resolved,
    so that delete and move act on a symlink itself instead of on what it points to; its parent
    directory is still resolved fully.

    Raises ToolFailure(PATH_ESCAPE) when the result is outside the workspace.
    """
    if "\0" in user_path:
        raise ToolFailure(f"path contains a NUL byte: {user_path!r}", ErrorKind.INVALID_ARGUMENTS)
    root = os.path.realpath(workspace)
    joined = os.path.join(root, user_path)
    name = os.path.basename(os.path.normpath(joined))
    if follow_final_symlink or name in ("", "..") or os.path.normpath(joined) == root:
        target = os.path.realpath(joined)
    else:
        target = os.path.join(os.path.realpath(os.path.dirname(os.path.normpath(joined))), name)
    if target != root and not target.startswith(root.rstrip(os.sep) + os.sep):
        raise ToolFailure(f"path escapes the workspace: {user_path}", ErrorKind.PATH_ESCAPE)
    return Path(target)
