"""Glob patterns with rg's (and .gitignore's) rules, compiled to regular expressions.

Who writes the globs and the paths is untrusted: a client's permission rules and deny list, a
model's `glob` patterns and paths. Translated as written, each wildcard is an unbounded repeat,
and Python's backtracking engine takes time exponential in their number on a path that nearly
matches: a rule of ten `**/` held the server's event loop (and the GIL) 23 s on one 30-component
path, and `*a*a*a*ax` 0.65 s on 200 characters. `compile_glob` makes every glob match in time
linear in the path:

- Without braces, each wildcard but the last of its kind is matched atomically at its first fit
  (`(?>...)`), which finds a match whenever one exists: a fixed-length chunk between two `*` of
  one component, placed as early as it fits, leaves the next `*` more of that component; the
  components between two `**/`, placed as early as they fit, leave the next `**/` more whole
  components. Python's `re` then never backtracks into them, and stays fast on the short paths
  of a listing.
- With braces (alternatives of different lengths, perhaps holding `/`), that argument fails: the
  glob goes to RE2, which runs any regex in linear time, at about twice `re`'s cost a path.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

import re2


class GlobPattern(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


def compile_glob(glob: str, *, any_directory: bool = False, suffix: str = "") -> GlobPattern:
    """`glob` (translate_glob's syntax) as a regex matched against a whole path: under any
    directories first when `any_directory`, and followed by `suffix` (a regex that matches the
    rest of the path at once, e.g. `(?:/.*)?`). Raises re.error for a glob no engine takes."""
    atomic = atomic_source(glob, any_directory)
    if atomic is not None:
        return re.compile(atomic + suffix, re.DOTALL)
    return _Linear(("(?:.*/)?" if any_directory else "") + translate_glob(glob) + suffix)


# Tokens of a glob: a `**/` directory wildcard, a trailing `**`, a `*`, a `/`, a `{...}` (a
# _Braces), or the regex of one character.
_DIRECTORIES, _REST, _STAR, _SLASH = object(), object(), object(), object()
_TOKEN_REGEX = {_DIRECTORIES: "(?:.*/)?", _REST: ".*", _STAR: "[^/]*", _SLASH: "/"}


class _Braces(tuple):
    """`{a,b}`: its alternatives, globs of their own."""


def _tokens(glob: str) -> list:
    """The glob read with rg's rules (see `glob_to_regex`)."""
    tokens: list = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**/", i) and (i == 0 or glob[i - 1] == "/"):
            tokens.append(_DIRECTORIES)
            i += 3
        elif glob.startswith("**", i) and (i == 0 or glob[i - 1] == "/") and i + 2 == len(glob):
            tokens.append(_REST)
            i += 2
        elif char == "*":
            tokens.append(_STAR)
            i += 1
        elif char == "?":
            tokens.append("[^/]")
            i += 1
        elif char == "[" and (end := glob.find("]", i + 2)) != -1:
            members = glob[i + 1 : end]
            negate = members[0] in "!^"
            members = members[1:] if negate else members
            tokens.append(f"[{'^' if negate else ''}{members.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        elif char == "{" and (end := _closing_brace(glob, i)) != -1:
            tokens.append(_Braces(_split_top_level(glob[i + 1 : end])))
            i = end + 1
        elif char == "\\" and i + 1 < len(glob):
            tokens.append(re.escape(glob[i + 1]))
            i += 2
        elif char == "/":
            tokens.append(_SLASH)
            i += 1
        else:
            tokens.append(re.escape(char))
            i += 1
    return tokens


def _within_a_component(token: object) -> bool:
    """Whether a one-character token never matches `/` (`[!a]` and `[.-0]` do). A class `re`
    refuses counts as not: RE2 then says what is wrong with it."""
    try:
        return re.fullmatch(token, "/") is None
    except re.error:
        return False


def atomic_source(glob: str, any_directory: bool = False) -> str | None:
    """The glob's regex in the atomic form (see the module), or None for a glob with braces or a
    class that may match `/` (the form needs components that `/` separates)."""
    tokens = _tokens(glob)
    if any(isinstance(token, _Braces) or (isinstance(token, str) and not _within_a_component(token))
           for token in tokens):
        return None
    # Components: _DIRECTORIES (its `/` included), _REST, or a component's tokens and whether a
    # `/` follows it.
    parts: list = [_DIRECTORIES] if any_directory else []
    current: list = []
    for token in tokens:
        if token is _DIRECTORIES or token is _REST:
            parts.append(token)
        elif token is _SLASH:
            parts.append((current, True))
            current = []
        else:
            current.append(token)
    if current or not parts or (parts[-1] is not _REST and parts[-1] is not _DIRECTORIES and parts[-1][1]):
        parts.append((current, False))
    out: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        if part is _DIRECTORIES:
            later = next((j for j in range(index + 1, len(parts)) if parts[j] is _DIRECTORIES), None)
            if later is not None:
                between = "".join(_component(*parts[k]) for k in range(index + 1, later))
                out.append(f"(?>(?:[^/]*/)*?{between})")
                index = later
                continue
            out.append("(?:[^/]*/)*")
        elif part is _REST:
            out.append(".*")
        else:
            out.append(_component(*part))
        index += 1
    return "".join(out)


def _component(tokens: list, slash: bool) -> str:
    chunks = ["".join(chunk) for chunk in _split_at_stars(tokens)]
    body = chunks[0]
    if len(chunks) > 1:
        body += "".join(f"(?>[^/]*?{chunk})" for chunk in chunks[1:-1]) + "[^/]*" + chunks[-1]
    return body + ("/" if slash else "")


def _split_at_stars(tokens: list) -> list[list[str]]:
    """Runs of one-character regexes between `*`s (several `*` in a row count as one)."""
    chunks: list[list[str]] = [[]]
    for token in tokens:
        if token is _STAR:
            if chunks[-1] or len(chunks) == 1:
                chunks.append([])
        else:
            chunks[-1].append(token)
    return chunks


class _Linear:
    """A regex run by RE2. RE2 takes UTF-8, which a lone surrogate (how Python names a file whose
    name is not UTF-8) is not: each is matched as U+FFFD, one character for one."""

    __slots__ = ("_match",)

    def __init__(self, source: str) -> None:
        try:
            compiled = re2.compile("(?s)" + re2_text(source))
        except re2.error as exc:
            raise re.error(f"{exc}") from None
        # The wrapper's fullmatch builds its match object in several Python steps (3.5 us a path:
        # 70 ms for a listing of 20,000); the RE2 object under it answers in about 1 us. It is
        # not public, so google-re2 is pinned (pyproject.toml).
        self._match = functools.partial(compiled._regexp.Match, re2._Anchor.ANCHOR_BOTH)

    def fullmatch(self, text: str) -> bool | None:
        data = re2_text(text).encode()
        # Spans of the match, (-1, -1) for none.
        return True if self._match(data, 0, len(data))[0][0] >= 0 else None


_SURROGATES = re.compile("[\ud800-\udfff]")


def re2_text(text: str) -> str:
    """`text` as RE2 can take it: UTF-8, which a lone surrogate (a JSON `\\ud800` escape, a file
    name that is not UTF-8) is not, so each is U+FFFD, one character for one."""
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
    pattern = dot_slash_anchored(pattern)
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    body = pattern.lstrip("/")
    if body.endswith("/"):
        body += "**"
    return compile_glob(body, any_directory=not anchored)


def dot_slash_anchored(glob: str) -> str:
    """`glob` with the `./` it starts with written `/`: both name the search directory, as whoever
    writes `./src/*.py` means, but rg and gitignore read `./` as a component named `.`, which no
    path they match holds, so the glob matched nothing, silently."""
    rest = glob
    while rest.startswith("./"):
        rest = rest[2:].lstrip("/")
    return glob if rest == glob else "/" + rest


def translate_glob(glob: str) -> str:
    """The regex source of a glob matched against a whole relative path (no anchoring rules), as
    written: fast, but see the module before matching untrusted paths with it."""
    out: list[str] = []
    for token in _tokens(glob):
        if isinstance(token, _Braces):
            out.append("(?:" + "|".join(translate_glob(alternative) for alternative in token) + ")")
        else:
            out.append(token if isinstance(token, str) else _TOKEN_REGEX[token])
    return "".join(out)


def expand_braces(glob: str, limit: int) -> list[str] | None:
    """The globs without braces that `glob`'s `{a,b}` alternatives stand for (read as `_tokens`
    reads them: not inside a `[...]` class nor after a `\\`); None when there are more than
    `limit`."""
    done, rest = [""], glob
    while (start := _first_brace(rest)) is not None:
        end = _closing_brace(rest, start)
        middles: list[str] = []
        for alternative in _split_top_level(rest[start + 1 : end]):
            expanded = expand_braces(alternative, limit)  # recursion as deep as the braces nest
            if expanded is None or len(middles) + len(expanded) > limit:
                return None
            middles += expanded
        if len(done) * len(middles) > limit:
            return None
        done = [before + rest[:start] + middle for before in done for middle in middles]
        rest = rest[end + 1 :]
    return [before + rest for before in done]


def _first_brace(glob: str) -> int | None:
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "\\":
            i += 2
        elif char == "[" and (end := glob.find("]", i + 2)) != -1:
            i = end + 1
        elif char == "{" and _closing_brace(glob, i) != -1:
            return i
        else:
            i += 1
    return None


# Labels of the automata `globs_overlap` runs: a character, any character but `/`, any at all, or
# a class (its regex).
_ANY, _NOT_SLASH = ("any",), ("not-slash",)


class Budget:
    """Work `globs_overlap` may still do: pairs of states looked at, across calls."""

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs

    @property
    def spent(self) -> bool:
        return self.pairs <= 0


def globs_overlap(first: str, second: str, budget: Budget, *, below_second: bool = False) -> bool:
    """Whether some path matches both globs (compile_glob's syntax), or with `below_second`, some
    path matching `first` lies below one `second` matches (is a path in a directory it names).
    May say True when it is not so, never the reverse: two classes are taken to share a
    character, and globs of too many alternatives, or met once `budget` is spent, are taken to
    overlap. Time linear in the product of the globs' lengths, each pair of states of their
    automata (and each call) taken from the budget."""
    budget.pairs -= 1
    firsts = expand_braces(first, 64) if "{" in first else [first]
    seconds = expand_braces(second, 64) if "{" in second else [second]
    if firsts is None or seconds is None or len(firsts) * len(seconds) > 64:
        return True
    return any(_overlap(_automaton(a, False), _automaton(b, below_second), budget)
               for a in firsts for b in seconds if _fixed_starts_agree(a, b))


def _fixed_starts_agree(first: str, second: str) -> bool:
    """Whether one glob's fixed start (its characters before the first wildcard) begins the
    other's: else no path begins with both."""
    a, b = _fixed_start(first), _fixed_start(second)
    return a.startswith(b) or b.startswith(a)


@functools.lru_cache(maxsize=4096)
def _fixed_start(glob: str) -> str:
    start = []
    escaped = False
    for char in glob:
        if escaped:
            start.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "*?[{":
            break
        else:
            start.append(char)
    return "".join(start)


@functools.lru_cache(maxsize=1024)
def _automaton(glob: str, below: bool) -> _Automaton:
    return _Automaton(glob, below)


class _Automaton:
    """A glob without braces as a nondeterministic automaton over characters."""

    def __init__(self, glob: str, below: bool = False) -> None:
        self.moves: list[list[tuple[tuple, int]]] = []
        self.empty: list[list[int]] = []  # moves without a character
        current = self._state()
        for token in _tokens(glob):
            following = self._state()
            if token is _STAR or token is _REST:
                self.moves[current].append((_NOT_SLASH if token is _STAR else _ANY, current))
                self.empty[current].append(following)
            elif token is _DIRECTORIES:  # nothing, or anything ending in `/`
                self.empty[current].append(following)
                inside = self._state()
                self.moves[current] += [(_ANY, inside), (("char", "/"), following)]
                self.moves[inside] += [(_ANY, inside), (("char", "/"), following)]
            elif token is _SLASH:
                self.moves[current].append((("char", "/"), following))
            else:
                self.moves[current].append((_label(token), following))
            current = following
        self.accepting = {current}
        if below:
            under = self._state()
            self.moves[current].append((("char", "/"), under))
            self.moves[under].append((_ANY, under))
            self.accepting.add(under)
        self.closures = [self._closure(state) for state in range(len(self.moves))]

    def _state(self) -> int:
        self.moves.append([])
        self.empty.append([])
        return len(self.moves) - 1

    def _closure(self, state: int) -> tuple[int, ...]:
        found, pending = {state}, [state]
        while pending:
            for following in self.empty[pending.pop()]:
                if following not in found:
                    found.add(following)
                    pending.append(following)
        return tuple(found)


def _label(token: str) -> tuple:
    if token == "[^/]":
        return _NOT_SLASH
    if token.startswith("["):
        return ("class", token)
    return ("char", token[1:] if token.startswith("\\") else token)


def _share_a_character(first: tuple, second: tuple) -> bool:
    if first is _ANY or second is _ANY:
        return True
    if first[0] == "char" and second[0] == "char":
        return first[1] == second[1]
    if first[0] != "char" and second[0] != "char":
        return True  # two classes, or a class and any character but `/`: taken to share one
    char, other = (first[1], second) if first[0] == "char" else (second[1], first)
    if other is _NOT_SLASH:
        return char != "/"
    try:
        return re.fullmatch(other[1], char) is not None
    except re.error:
        return True


def _overlap(first: _Automaton, second: _Automaton, budget: Budget) -> bool:
    pending = [(a, b) for a in first.closures[0] for b in second.closures[0]]
    seen = set(pending)
    budget.pairs -= len(seen)
    while pending:
        if budget.spent:
            return True
        a, b = pending.pop()
        if a in first.accepting and b in second.accepting:
            return True
        for label_a, next_a in first.moves[a]:
            for label_b, next_b in second.moves[b]:
                if not _share_a_character(label_a, label_b):
                    continue
                for pair in ((x, y) for x in first.closures[next_a] for y in second.closures[next_b]):
                    if pair not in seen:
                        budget.pairs -= 1
                        seen.add(pair)
                        pending.append(pair)
    return False


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
