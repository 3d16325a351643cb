"""Glob patterns with rg's (and .gitignore's) rules, compiled to regular expressions.

Who writes the globs and the paths is untrusted: a client's permission rules and deny list, a
model's `glob` patterns and paths. Each wildcard becomes an unbounded repeat, and Python's
backtracking engine takes time exponential in their number on a path that nearly matches: a rule
of ten `**/` held the server's event loop (and the GIL) 23 s on one 30-component path, and
`*a*a*a*ax` 0.65 s on 200 characters. `compile_glob_regex` gives a regex with more than one
repeat, or any alternation, to RE2, which runs in time linear in the path; one with at most one
repeat cannot backtrack more than linearly, and stays with `re`, 15x faster on the short paths of
a listing.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

import re2


class GlobPattern(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


def compile_glob_regex(source: str) -> GlobPattern:
    """`source`, a regex `translate_glob` wrote (with `.` matching newlines too). Raises re.error
    for one neither engine takes."""
    return re.compile(source, re.DOTALL) if _backtracks_linearly(source) else _Linear(source)


def _backtracks_linearly(source: str) -> bool:
    """Whether `re` matches `source` in time linear in the path: at most one `[^/]*`, between an
    optional leading `(?:.*/)?` (it backtracks once per `/`, and what follows stops at the next
    one) and an optional trailing `.*` or `(?:/.*)?` (they match the rest at once), and no
    alternation. A `*` is counted wherever it is (an escaped literal too: that only picks RE2)."""
    body = source.removeprefix("(?:.*/)?")
    body = body.removesuffix("(?:/.*)?") if body.endswith("(?:/.*)?") else body.removesuffix(".*")
    return "|" not in source and ".*" not in body and body.count("*") <= 1


class _Linear:
    """A regex run by RE2. RE2 takes UTF-8, which a lone surrogate (how Python names a file whose
    name is not UTF-8) is not: each is matched as U+FFFD, one character for one."""

    __slots__ = ("_match",)

    def __init__(self, source: str) -> None:
        try:
            compiled = re2.compile("(?s)" + _utf8(source))
        except re2.error as exc:
            raise re.error(f"{exc}") from None
        # The wrapper's fullmatch builds its match object in several Python steps (3.5 us a path:
        # 70 ms for a listing of 20,000); the RE2 object under it answers in about 1 us. It is
        # not public, so google-re2 is pinned (pyproject.toml).
        self._match = functools.partial(compiled._regexp.Match, re2._Anchor.ANCHOR_BOTH)

    def fullmatch(self, text: str) -> bool | None:
        data = _utf8(text).encode()
        # Spans of the match, (-1, -1) for none.
        return True if self._match(data, 0, len(data))[0][0] >= 0 else None


_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def glob_to_regex(pattern: str) -> GlobPattern:
    """Compile a glob with rg's (gitignore's) rules, matched against paths relative to the search dir.

    `*` and `?` stay within one path component, `**` spans components, `[...]` and `{a,b}` work
    as in rg; a pattern without a `/` matches a file name at any depth, one with a `/` is
    anchored at the search directory.

    rg --glob is not used for this because a file matching it is listed even when .gitignore
    excludes it.
    """
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    body = pattern.lstrip("/")
    if body.endswith("/"):
        body += "**"
    regex = translate_glob(body)
    return compile_glob_regex(regex if anchored else f"(?:.*/)?{regex}")


def translate_glob(glob: str) -> str:
    """The regex source of a glob matched against a whole relative path (no anchoring rules)."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**/", i) and (i == 0 or glob[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i) and (i == 0 or glob[i - 1] == "/") and i + 2 == len(glob):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[" and (end := glob.find("]", i + 2)) != -1:
            members = glob[i + 1 : end]
            negate = members[0] in "!^"
            members = members[1:] if negate else members
            out.append(f"[{'^' if negate else ''}{members.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        elif char == "{" and (end := _closing_brace(glob, i)) != -1:
            alternatives = _split_top_level(glob[i + 1 : end])
            out.append("(?:" + "|".join(translate_glob(alt) for alt in alternatives) + ")")
            i = end + 1
        elif char == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _closing_brace(glob: str, start: int) -> int:
    depth = 0
    for index in range(start, len(glob)):
        if glob[index] == "{":
            depth += 1
        elif glob[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _split_top_level(inner: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in inner:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts
