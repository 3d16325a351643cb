"""Glob patterns with rg's (and .gitignore's) rules, compiled to regular expressions."""

from __future__ import annotations

import re


def glob_to_regex(pattern: str) -> re.Pattern[str]:
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
    return re.compile(regex if anchored else f"(?:.*/)?{regex}", re.DOTALL)


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
