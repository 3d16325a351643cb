"""Protected and denied paths, as the file tools and the sandbox's mounts both see them."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def protected_targets(root: Path, patterns: Iterable[str]) -> Iterator[Path]:
    """Each protected path of the workspace whose real path is `root`, with `*` expanded among
    existing entries and symlinks resolved (a `.git/hooks` that links elsewhere protects where it
    points). Entries that do not exist are given as their real parent plus the missing rest."""
    for pattern in patterns:
        path = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
        matches = glob.glob(glob.escape(path).replace("[*]", "*")) if "*" in pattern else [path]
        for match in matches:
            yield Path(os.path.realpath(match))


def within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def overlap(target: Path, guarded: Iterable[Path]) -> Path | None:
    """The first guarded path that `target` is inside of, or that is inside `target` (changing a
    parent changes what it holds); None when there is none."""
    for path in guarded:
        if within(target, path) or within(path, target):
            return path
    return None
