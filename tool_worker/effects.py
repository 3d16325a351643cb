"""What a tool call may read and write in its workspace, so calls can be ordered by what they
touch rather than by their lane alone.

The guarantee this serves: every call sees the workspace exactly as if the calls of a model
response ran one after another, in model order. Two calls must keep their model order when one
may write what the other reads or writes; any other two may run at the same time. A tool
declares its effects with its spec (`Tool.effects`); a tool that declares none (bash, execute,
plugins) is taken to read and write everything, which orders it against every other call.

Paths are workspace-relative and normalized (`a/b`, `.` for the workspace itself). A write of a
path may change it and everything under it. A read scope is a root, optionally narrowed by a
glob pattern relative to it (`glob(pattern="**/*.py")` only sees files the pattern matches).
Ignore files (.gitignore, .ignore, .rgignore, a repository's .git/info/exclude) change what every
listing under their directory shows, and rg reads those of a scope's parent directories too, so a
write of one reaches every read scope that contains it or lies under its directory.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tool_worker.tools.globs import glob_to_regex

IGNORE_FILES = frozenset({".gitignore", ".ignore", ".rgignore"})
# The repository's own excludes, read by rg for every path of the repository.
_GIT_EXCLUDE = ".git/info/exclude"


@dataclass(frozen=True)
class ReadScope:
    root: str
    # A glob relative to `root` (the tools' glob syntax); None: everything under it.
    pattern: str | None = None


@dataclass(frozen=True)
class WritePath:
    path: str
    # True when the path is known to name a file (write, edit): only that path changes. False:
    # it may be a directory, so everything under it may change (delete, move, copy).
    file: bool = False


@dataclass(frozen=True)
class Effects:
    """None for either side means "anything": the call is ordered against every other call."""

    reads: tuple[ReadScope, ...] | None = ()
    writes: tuple[WritePath, ...] | None = ()

    def conflicts_with(self, earlier: Effects) -> bool:
        """Whether this call must wait for an `earlier` one that has not finished."""
        return _writes_touch(earlier.writes, self.reads, self.writes) or _writes_touch(
            self.writes, earlier.reads, earlier.writes
        )


EVERYTHING = Effects(reads=None, writes=None)

EffectsFunction = Callable[[Mapping[str, Any]], Effects]


def normalize(path: str, workspace: str | None = None) -> str:
    """A workspace-relative, normalized path ("." for the workspace); absolute paths inside the
    workspace become relative, others stay absolute (they touch nothing the calls share)."""
    path = path.strip() or "."
    if os.path.isabs(path):
        if workspace is None:
            return posixpath.normpath(path)
        root = posixpath.normpath(workspace)
        normal = posixpath.normpath(path)
        if normal == root:
            return "."
        if normal.startswith(root.rstrip("/") + "/"):
            return normal[len(root.rstrip("/")) + 1 :]
        return normal
    return posixpath.normpath(path)


def resolved_too(path: str, workspace: str) -> list[str]:
    """The path as named and, when a symlink makes it another path inside the workspace, that
    one too: a call through a link and a call on its target touch the same file."""
    named = normalize(path, workspace)
    try:
        real_root = os.path.realpath(workspace)
        real = os.path.realpath(os.path.join(real_root, named))
    except (OSError, ValueError):
        return [named]
    other = normalize(real, real_root)
    return [named] if other == named else [named, other]


def reads(*argument_defaults: tuple[str, str | None], pattern_argument: str | None = None) -> EffectsFunction:
    """Effects of a tool that reads the paths its arguments name: (argument, default) pairs;
    with `pattern_argument`, the read is narrowed to that glob under the path."""

    def effects(arguments: Mapping[str, Any]) -> Effects:
        pattern = arguments.get(pattern_argument) if pattern_argument else None
        scopes = []
        for name, default in argument_defaults:
            value = arguments.get(name, default)
            if value is None:
                continue
            if not isinstance(value, str):
                return EVERYTHING
            scopes.append(ReadScope(value, pattern if isinstance(pattern, str) and pattern else None))
        return Effects(reads=tuple(scopes), writes=())

    return effects


def writes(*arguments_named: str, files: bool = False, reading: Iterable[str] = ()) -> EffectsFunction:
    """Effects of a tool that writes the paths its arguments name (`files`: they name files, not
    directories), and reads those named by `reading`."""

    def effects(arguments: Mapping[str, Any]) -> Effects:
        targets = [arguments.get(name) for name in arguments_named]
        sources = [arguments.get(name) for name in reading]
        if not all(isinstance(value, str) and value for value in (*targets, *sources)):
            return EVERYTHING
        return Effects(
            reads=tuple(ReadScope(source) for source in sources),
            writes=tuple(WritePath(target, files) for target in targets),
        )

    return effects


def in_workspace(effects: Effects, workspace: str) -> Effects:
    """The effects with every path normalized against the workspace, symlinks followed too."""
    if effects.reads is not None:
        effects_reads = tuple(
            ReadScope(path, scope.pattern) for scope in effects.reads for path in resolved_too(scope.root, workspace)
        )
    else:
        effects_reads = None
    if effects.writes is not None:
        effects_writes = tuple(
            WritePath(path, write.file) for write in effects.writes for path in resolved_too(write.path, workspace)
        )
    else:
        effects_writes = None
    return Effects(effects_reads, effects_writes)


def _writes_touch(
    writes_: tuple[WritePath, ...] | None,
    reads_: tuple[ReadScope, ...] | None,
    other_writes: tuple[WritePath, ...] | None,
) -> bool:
    if writes_ is None:
        return reads_ is None or bool(reads_) or other_writes is None or bool(other_writes)
    if not writes_:
        return False
    if reads_ is None or other_writes is None:
        return True
    return any(_reaches(w, scope) for w in writes_ for scope in reads_) or any(
        _overlap(w.path, other.path) for w in writes_ for other in other_writes
    )


def _reaches(write: WritePath, scope: ReadScope) -> bool:
    if _contains(write.path, scope.root):  # the write covers the whole scope (or is its root)
        return True
    governed = _ignore_file_directory(write.path)
    if governed is not None and _contains(governed, scope.root):
        return True  # an ignore file in the scope's root or one of its parents
    if not _contains(scope.root, write.path):
        return False  # disjoint subtrees
    if scope.root != ".":
        # A file written under the scope's root creates that root when an earlier call of the
        # turn removed it: the listing's answer changes ("not a directory" -> "No files match"),
        # whether the file matches or not. The workspace's root is always there.
        return True
    if scope.pattern is None or posixpath.basename(write.path) in IGNORE_FILES or not write.file:
        return True
    relative = write.path if scope.root == "." else write.path[len(scope.root) + 1 :]
    return _matches(scope.pattern, relative)


def _ignore_file_directory(path: str) -> str | None:
    """The directory whose listings an ignore file at `path` governs; None when it is not one."""
    if posixpath.basename(path) in IGNORE_FILES:
        return posixpath.dirname(path) or "."
    if path == _GIT_EXCLUDE or path.endswith("/" + _GIT_EXCLUDE):
        return path[: -len(_GIT_EXCLUDE)].rstrip("/") or "."
    return None


def _contains(ancestor: str, path: str) -> bool:
    """Whether `path` is `ancestor` or under it."""
    if ancestor == "." and not os.path.isabs(path):
        return True
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _overlap(a: str, b: str) -> bool:
    return _contains(a, b) or _contains(b, a)


def _matches(pattern: str, relative: str) -> bool:
    """The glob tool's own matching (a pattern without a slash matches a name at any depth)."""
    try:
        return glob_to_regex(pattern).fullmatch(relative) is not None
    except re.error:
        return True  # a pattern the tool will refuse: ordering it conservatively costs nothing
