"""Small file helpers shared by the write-side tools."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tool_worker.tools.base import ToolFailure


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a partial one.

    The temporary file lives in the same directory (os.replace is atomic only within a file
    system) and gets the mode of the file it replaces, or the umask default for a new one.
    """
    if path.is_dir():
        raise ToolFailure(f"{path.name} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def is_binary(head: bytes) -> bool:
    """The heuristic of git and grep: a NUL byte in the first block means binary."""
    return b"\0" in head


def remove_existing(path: Path) -> None:
    """Clear the way for an overwrite: a directory goes with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_destination(source: Path, destination: Path, shown: str, overwrite: bool) -> None:
    """Refuse a move or copy that would lose data or never finish."""
    if destination == source:
        raise ToolFailure("source and destination are the same path")
    if source.is_dir() and not source.is_symlink() and destination.is_relative_to(source):
        raise ToolFailure(f"cannot put directory {source.name} inside itself ({shown})")
    if source.is_relative_to(destination):
        raise ToolFailure(f"destination {shown} contains the source; replacing it would destroy the source")
    if (destination.exists() or destination.is_symlink()) and not overwrite:
        raise ToolFailure(f"destination {shown} already exists; set overwrite=true to replace it")


def source_destination_schema(source_help: str, destination_help: str) -> dict[str, Any]:
    """Arguments of the tools that take a path to a new path (copy, move)."""
    return {
        "type": "object",
        "properties": {
            "source": {"type": "string", "minLength": 1, "description": source_help},
            "destination": {"type": "string", "minLength": 1, "description": destination_help},
            "overwrite": {"type": "boolean", "description": "Replace an existing destination (default false)."},
        },
        "required": ["source", "destination"],
        "additionalProperties": False,
    }
