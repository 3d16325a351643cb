"""Confine tool paths to a workspace.

Paths are compared after resolving every symlink, of the workspace and of the target, so a
link inside the workspace that points outside is an escape, and one that points inside is not.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tool_worker.tools.base import ErrorKind, ToolFailure

# Linux's PATH_MAX: no longer path can be opened, so a longer argument is refused as it is.
MAX_PATH_BYTES = 4096


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
        raise ToolFailure(f"path contains a NUL byte: {user_path[:200]!r}", ErrorKind.INVALID_ARGUMENTS)
    try:
        size = len(user_path.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a surrogateescape'd byte it is not
        raise ToolFailure(
            f"path holds a lone surrogate (U+{ord(exc.object[exc.start]):04X}), which no file name has; "
            "send the path without it",
            ErrorKind.INVALID_ARGUMENTS,
        ) from None
    if size > MAX_PATH_BYTES:
        raise ToolFailure(
            f"path is {size} bytes long: at most {MAX_PATH_BYTES} are allowed ({user_path[:80]!r}...)",
            ErrorKind.INVALID_ARGUMENTS,
        )
    root = os.path.realpath(workspace)
    joined = os.path.join(root, user_path)
    name = os.path.basename(os.path.normpath(joined))
    if follow_final_symlink or name in ("", "..") or os.path.normpath(joined) == root:
        target = _real(joined, user_path)
    else:
        target = os.path.join(_real(os.path.dirname(os.path.normpath(joined)), user_path), name)
    if target != root and not target.startswith(root.rstrip(os.sep) + os.sep):
        raise ToolFailure(f"path escapes the workspace: {user_path}", ErrorKind.PATH_ESCAPE)
    return Path(target)


def _real(path: str, user_path: str) -> str:
    """`path` with every symlink resolved, or ToolFailure when a symlink loop stands in the way.

    Not `os.path.realpath` alone: on a loop it stops resolving and returns the rest of the path
    as written, symlinks and all, so `loop/../link` came back as `link` itself, a symlink that
    the tool then followed past the workspace's bounds and the session's deny rules. A path that
    does not exist yet (one a tool will create) is resolved as far as it exists, and must come
    out fully resolved: resolving it again changes nothing."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as exc:
        refusal = _refusal(exc, user_path)
        if refusal is not None:
            raise refusal from None
    resolved = os.path.realpath(path)
    if os.path.realpath(resolved) != resolved:
        raise ToolFailure(
            f"{user_path} passes through a symlink loop (a link that leads back to itself): it names no file",
            ErrorKind.PATH_ESCAPE,
        )
    _refuse_symlink_loop(resolved, user_path)
    return resolved


def _refuse_symlink_loop(target: str, user_path: str) -> None:
    """Whoever opened a path through a symlink loop would get ELOOP: say so plainly instead,
    before any tool touches it."""
    try:
        os.stat(target)
    except OSError as exc:
        refusal = _refusal(exc, user_path)
        if refusal is not None:
            raise refusal from None


def _refusal(exc: OSError, user_path: str) -> ToolFailure | None:
    """The refusal a failed lookup of `user_path` means, or None (it may not exist yet)."""
    if exc.errno == errno.ELOOP:
        return ToolFailure(
            f"{user_path} is a symlink loop (a link that leads back to itself): it names no file",
            ErrorKind.PATH_ESCAPE,
        )
    if exc.errno == errno.ENAMETOOLONG:
        return ToolFailure(
            f"a component of {user_path[:80]!r} is longer than the file system allows",
            ErrorKind.INVALID_ARGUMENTS,
        )
    return None
