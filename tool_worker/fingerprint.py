"""A cheap fingerprint of a workspace, computed the same way by the hub and by workers.

The hub only routes a workspace's calls to a worker whose fingerprint matches its own: a worker
that sees another copy, or a stale one, disagrees on names, sizes or modification times.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Enough of the tree to tell copies apart, small enough to compute in milliseconds.
FINGERPRINT_MAX_DEPTH = 2
FINGERPRINT_MAX_ENTRIES = 2000
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".codelane"})


def workspace_fingerprint(workspace: str | Path) -> str:
    """Hash of (relative path, size, mtime in whole seconds) of the first entries of the tree.

    Raises OSError when the workspace cannot be read.
    """
    root = Path(workspace)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    digest = hashlib.sha256()
    entries = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack and entries < FINGERPRINT_MAX_ENTRIES:
        directory, depth = stack.pop()
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for entry in children:
            if entries >= FINGERPRINT_MAX_ENTRIES:
                break
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            relative = os.path.relpath(entry.path, root)
            is_dir = entry.is_dir(follow_symlinks=False)
            size = 0 if is_dir else stat.st_size
            digest.update(f"{relative}\0{size}\0{int(stat.st_mtime)}\n".encode())
            entries += 1
            if is_dir and depth < FINGERPRINT_MAX_DEPTH and entry.name not in SKIPPED_DIRS:
                stack.append((Path(entry.path), depth + 1))
    return digest.hexdigest()
