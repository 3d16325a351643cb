"""Paths a session's policy denies reading, as the tools apply them to what they read and list.

The session server sends these globs with every call (`Assign.denied_paths` in worker.proto, whose
comment is the normative description of the syntax); tools refuse to read a denied path and
leave denied paths out of listings and search results.

A glob is matched against a path relative to the workspace root: components separated by `/`,
no leading `./`, no `.` or `..` components, no trailing `/`, the root itself being `.`; on the
whole path, case-sensitively. `*` matches any run of characters other than `/`, `?` one such
character; `**/` at the start or after a `/` matches zero or more whole directories; `**` as the
whole last component matches anything, `/` included; `dir/**` also matches `dir`; `[...]` is a
character class (`[!...]` or `[^...]` negated) ending at the first `]` after its first member;
`{a,b}` matches either glob; `\\` makes the next character literal; anything else matches itself.

A path is denied when it, or a directory above it, matches; and it is checked twice: as named,
and with its symlinks resolved (as `tool_worker.sandbox` resolves them) relative to the real
workspace root. So a link to a denied file is denied, and so is everything in a denied directory.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from collections.abc import Iterable

from tool_worker.tools.globs import Budget, GlobPattern, compile_glob, expand_braces, globs_overlap

# Alternatives an absolute glob's braces may stand for when it is placed in a workspace.
MAX_BRACE_ALTERNATIVES = 1024


@functools.lru_cache(maxsize=1024)
def compile_path_glob(glob: str) -> GlobPattern:
    """A path glob as a regex (see the module docstring); `dir/**` also matches `dir` itself."""
    while glob.startswith("./"):
        glob = glob[2:]
    glob = glob or "."
    if glob.endswith("/**"):
        return compile_glob(glob[:-3], suffix="(?:/.*)?")
    return compile_glob(glob)


def may_deny(pattern: str, glob: str, budget: Budget) -> bool:
    """Whether the deny glob `glob` may deny a path that the glob `pattern` matches (it, or a
    directory above it, matches): what a shell glob word may expand to. May say True when it
    does not (see `globs_overlap`: past `budget`, it does), never the reverse."""
    key = (pattern, glob)
    known = _MAY_DENY.get(key)
    if known is not None:
        budget.pairs -= 1
        return known
    if glob.endswith("/**") and len(glob) > 3:
        glob = glob[:-3]  # `dir/**` is `dir` and what it holds
    answer = globs_overlap(pattern, glob or ".", budget, below_second=True)
    if not budget.spent:  # an answer forced by the budget is not this pair's
        if len(_MAY_DENY) >= 4096:
            _MAY_DENY.clear()
        _MAY_DENY[key] = answer
    return answer


_MAY_DENY: dict[tuple[str, str], bool] = {}


def normalise_relative(path: str) -> str:
    """`path` (relative to the workspace root) in the form globs are matched against."""
    normal = posixpath.normpath(path.strip() or ".")
    # normpath keeps a leading "//"; one slash is the same directory.
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def ancestors_and_self(path: str) -> Iterable[str]:
    """`a/b/c`, then `a/b`, then `a`: what a deny of a directory also covers."""
    yield path
    while (parent := posixpath.dirname(path)) not in ("", path):
        path = parent
        yield path


def relative_to_root(root: str, path: str) -> str | None:
    """`path` (absolute) relative to `root`, or None when it lies outside it."""
    if path == root:
        return "."
    base = root.rstrip(os.sep) + os.sep
    return path[len(base):] if path.startswith(base) else None


@functools.lru_cache(maxsize=1024)
def globs_within(glob: str, root: str, covering: bool) -> tuple[str, ...] | None:
    """What the absolute `glob` matches inside the directory `root` (absolute, normalised), as
    globs relative to it: `/ws/src/**` in `/ws` is `src/**`, `/home/*/ws/.env` in `/home/me/ws` is
    `.env`, `/**/secret/**` is `**/secret/**`. `covering` (a deny or ask rule, which also covers
    what lies below what it matches): a glob matching `root` itself or a directory above it
    covers all of it, `**`. Empty when the glob matches nothing there; None when its braces
    stand for more than MAX_BRACE_ALTERNATIVES globs."""
    alternatives = expand_braces(glob, MAX_BRACE_ALTERNATIVES)
    if alternatives is None:
        return None
    names = [name for name in root.split("/") if name]
    found: list[str] = []
    for alternative in alternatives:
        parts = [part for part in alternative.split("/") if part not in ("", ".")]
        _place(parts, names, covering, found)
    return tuple(dict.fromkeys(found))


def _place(parts: list[str], names: list[str], covering: bool, found: list[str]) -> None:
    """The glob's components `parts` matched against the root's `names`, from the top: what is
    left of the glob once every name is matched, in each way it can be."""
    seen: set[tuple[int, int]] = set()
    pending = [(0, 0)]
    while pending:
        state = pending.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if j == len(names):
            rest = "/".join(parts[i:])
            if not rest:
                rest = "**" if covering else "."  # the root itself
            found.append(rest)
        elif i == len(parts):
            if covering:
                found.append("**")  # a directory above the root: everything in it
        elif parts[i] == "**":
            if i == len(parts) - 1:
                found.append("**")
            else:
                pending += [(i + 1, j), (i, j + 1)]
        elif _component_matches(parts[i], names[j], covering):
            pending.append((i + 1, j + 1))


@functools.lru_cache(maxsize=1024)
def _component_matches(part: str, name: str, covering: bool) -> bool:
    try:
        return compile_glob(part).fullmatch(name) is not None
    except re.error:
        return covering  # a component that cannot stand alone (`[/]`): a deny assumes the worst


def literal_glob(path: str) -> str:
    """A glob that matches exactly `path` (relative, with `/` between components): its special
    characters escaped."""
    return re.sub(r"([\\*?\[{])", r"\\\1", path)


class DeniedPaths:
    """A compiled set of deny globs. Empty (and falsy) when the policy denies no path."""

    def __init__(self, globs: Iterable[str] = ()) -> None:
        self.globs = tuple(globs)
        self._patterns = tuple(compile_path_glob(g) for g in self.globs)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def matching(self, relative: str) -> str | None:
        """The glob denying `relative` (normalised, relative to the root) or a directory above it."""
        for candidate in ancestors_and_self(relative):
            for glob, pattern in zip(self.globs, self._patterns, strict=True):
                if pattern.fullmatch(candidate):
                    return glob
        return None

    def denies(self, root: str, relative: str) -> str | None:
        """The glob denying the path `relative` (to the real workspace root `root`), as named or
        with its symlinks resolved; None when it may be read."""
        if not self._patterns:
            return None
        named = normalise_relative(relative)
        glob = self.matching(named)
        if glob is not None:
            return glob
        resolved = relative_to_root(root, os.path.realpath(os.path.join(root, named)))
        if resolved is not None and resolved != named:
            return self.matching(resolved)
        return None
