"""What a shell command line does, as far as permission rules care: its simple commands, the files
its redirections read and write, and the options of its commands that write or run something.

A real parser (`bashlex`) reads the line, so quoting, pipes, lists, subshells, compound commands
and substitutions are seen as bash sees them: `git log $(rm -rf x)` holds two commands, and
`echo 'a; rm x'` one. What the parser cannot read, or what depends on run-time values (a
redirection to `$OUT`), is marked `opaque`: no allow rule can vouch for it, while deny and ask
rules still match the raw text.

A word the shell expands is known only at run time too: a parameter, a substitution, a `~`, and
an unquoted glob (`*`, `?`, `[...]`) or brace expansion (`{a,b}`, `{1..3}`), which bash turns
into the names of whatever files match (`cat s*/key` reads `secret/key`). What such a word may
name is kept as an `Expansion`: the words its braces stand for, each a path or a glob, for path
rules to match. Quoted, `'*.py'` and `"s*"` are the words they say.

Pure domain logic: no grpc, no I/O.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import bashlex
import bashlex.errors

# Redirection targets that are not files of the workspace: writing there changes nothing.
HARMLESS_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})

# Options that make a command write a file or run another command. A prefix rule such as
# `bash(git *)` never covers them where its wildcard stands: `git -c alias.x='!rm -rf ~' x` and
# `git log --output=/etc/x` are not "git commands" in the sense the rule's author meant. Each
# entry is an fnmatch pattern over one word. The list is a heuristic and says so: it names the
# usual suspects, and an operator who must be sure uses exact rules, `ask` or a sandbox.
_ANY_PROGRAM = ("--output", "--output=*", "--output-file*", "--output-document*", "--out-file*", "--log-file*")
WRITING_OPTIONS: dict[str, tuple[str, ...]] = {
    "git": (
        "-c", "-c?*", "--config-env*", "--exec-path*", "-C", "-C?*", "--git-dir*", "--work-tree*",
        "--upload-pack*", "--receive-pack*", "-u", "--exec*", "-x", "--ext-diff", "--textconv",
        "-O*", "--open-files-in-pager*", "-o", "--template*", "--namespace*",
    ),
    "find": ("-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0", "-fprintf", "-fls"),
    "sed": ("-i*", "--in-place*"),
    "sort": ("-o*",),
    "curl": (
        "-o*", "-O", "--remote-name*", "-K*", "--config*", "-D*", "--dump-header*", "-c*", "--cookie-jar*",
        "--trace*", "--stderr*",
    ),
    "wget": ("-O*", "-o*", "-a*", "--append-output*", "-P*", "--directory-prefix*"),
    "rg": ("--pre", "--pre=*"),
    "dd": ("of=*",),
    "tar": ("-x*", "-c*", "-f*", "--file*", "--to-command*", "--extract", "--create"),
}

# Alternatives a word's braces may stand for, at most: past it, the word may name any path.
MAX_BRACE_WORDS = 256
# Working directories a line's `cd`s may lead to that its relative paths are checked below, at
# most (`ShellLine.directories`); past it, they may be anywhere.
MAX_DIRECTORIES = 32


class Access(enum.StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Expansion:
    """What a word with an unquoted glob or brace expansion may become, its braces expanded:
    `paths`, the words without a wildcard left; `globs`, the others, in `tool_worker.denied`'s
    syntax (the word's quoted and literal characters escaped). Too many braces: the glob `**`."""

    paths: tuple[str, ...]
    globs: tuple[str, ...]


@dataclass(frozen=True)
class SimpleCommand:
    """One simple command: its words as the program receives them (quotes removed), assignments
    first, and for each word whether it holds an expansion whose value is only known at run time,
    and (`expansions`) what it may name as a path when that is a glob or brace expansion (of the
    value, for `--option=value`)."""

    words: tuple[str, ...]
    expanded: tuple[bool, ...]
    expansions: tuple[Expansion | None, ...] = ()

    @property
    def text(self) -> str:
        """The words joined by single spaces: what command globs are matched against."""
        return " ".join(self.words)

    @property
    def program(self) -> str:
        """The command's name without its directory (`/usr/bin/git` is `git`); "" if none."""
        for word in self.words:
            if not _is_assignment(word):
                return posixpath.basename(word)
        return ""


@dataclass(frozen=True)
class Redirection:
    access: Access
    # The file, as written (relative to the working directory); None when it is only known at
    # run time (`> $OUT`, `> *.log`).
    target: str | None
    # For a glob or brace target (`> *.log`), what it may name.
    expansion: Expansion | None = None


@dataclass(frozen=True)
class ShellLine:
    """Everything a command line runs, reads and writes that permission rules look at."""

    raw: str
    commands: tuple[SimpleCommand, ...]
    redirections: tuple[Redirection, ...]
    # Why no allow rule can vouch for the line; None when every part is known.
    opaque: str | None = None

    def mentioned_paths(self) -> Iterator[str]:
        """Words that may name files: every argument that is not an option, and the value of
        `--option=value`; for a glob or brace word, also the words its braces stand for. Deny
        rules on paths match them; they are not proof of a read."""
        for command in self.commands:
            for word in command.words[1:]:
                if word.startswith("-"):
                    _, equals, value = word.partition("=")
                    if equals and value:
                        yield value
                elif word:
                    yield word.partition("=")[2] if _is_assignment(word) else word
            for expansion in self._expansions(command):
                yield from expansion.paths

    def mentioned_globs(self) -> Iterator[str]:
        """The globs of what glob words may name (`cat s*/key`: `s*/key`)."""
        for command in self.commands:
            for expansion in self._expansions(command):
                yield from expansion.globs

    def directories(self) -> tuple[str, ...] | None:
        """The working directories its `cd` and `pushd` commands may move to, as written from where
        the line starts (each from every directory before it: `cd src && cd lib`): a relative
        path the line names may be below any of them (`cd src && cat ../secret/key` reads
        secret/key). A target known only at run time (`cd $D`, `cd ~`) is left out, as any such
        value is. None past MAX_DIRECTORIES: anywhere."""
        found: list[str] = []
        for command in self.commands:
            words = list(zip(command.words, command.expanded, strict=False))
            while words and (_is_assignment(words[0][0]) or words[0][0] in ("builtin", "command")):
                words.pop(0)  # `builtin cd src` is `cd src`
            if not words or words[0][0] not in ("cd", "pushd"):
                continue
            targets = [(word, expanded) for word, expanded in words[1:] if not word.startswith(("-", "+"))]
            if not targets or targets[0][1]:
                continue
            target = targets[0][0]
            for base in ["", *found]:
                joined = posixpath.join(base, target)
                if joined not in found:
                    found.append(joined)
            if len(found) > MAX_DIRECTORIES:
                return None
        return tuple(found)

    @staticmethod
    def _expansions(command: SimpleCommand) -> Iterator[Expansion]:
        for word, expansion in zip(command.words[1:], command.expansions[1:], strict=False):
            if expansion is not None and (not word.startswith("-") or "=" in word):
                yield expansion


def parse_shell(command: str) -> ShellLine:
    """Reads a bash command line. Never raises: an unreadable line is returned `opaque`."""
    raw = command.strip()
    if not raw:
        return ShellLine(raw, (), (), "the command is empty")
    try:
        trees = bashlex.parse(raw)
    except (bashlex.errors.ParsingError, NotImplementedError, IndexError, TypeError, ValueError,
            AttributeError, AssertionError, RecursionError) as exc:
        return ShellLine(raw, _fallback_commands(raw), (), f"the shell parser cannot read it ({type(exc).__name__})")
    walker = _Walker(raw)
    for tree in trees:
        walker.visit(tree)
    return ShellLine(raw, tuple(walker.commands), tuple(walker.redirections), walker.opaque)


def argv_line(argv: Sequence[str]) -> ShellLine:
    """An argv run without a shell (the execute tool): one command, no redirections."""
    words = tuple(str(word) for word in argv)
    return ShellLine(" ".join(words), (SimpleCommand(words, (False,) * len(words)),), ())


def writing_option(command: SimpleCommand, word: str) -> bool:
    """Whether `word`, an argument of `command`, makes it write a file or run something."""
    patterns = (*_ANY_PROGRAM, *WRITING_OPTIONS.get(command.program, ()))
    return any(fnmatchcase(word, pattern) for pattern in patterns)


def _is_assignment(word: str) -> bool:
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier()


# Commands split at control operators, for deny rules when the parser gives up (the old way:
# stricter for deny, since quotes are ignored).
_SEPARATOR = re.compile(r"&&|\|\||[;&|\n]|\$\(|`|\)")
# What in a here-document's body runs a command when it is expanded: `$(...)`, `` `...` ``
# (also within `${...}` or `$((...))`).
_RUNS_A_COMMAND = re.compile(r"\$\(|`")


def _fallback_commands(raw: str) -> tuple[SimpleCommand, ...]:
    pieces = [piece.split() for piece in _SEPARATOR.split(raw)]
    return tuple(
        SimpleCommand(tuple(words), (True,) * len(words), tuple(_path_expansion(word) for word in words))
        for words in pieces if words
    )


class _Walker:
    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.commands: list[SimpleCommand] = []
        self.redirections: list[Redirection] = []
        self.opaque: str | None = None

    def visit(self, node) -> None:
        kind = node.kind
        if kind == "command":
            self._command(node)
        elif kind == "function":
            # A function runs its body wherever it is called: its commands are checked as if
            # they ran here, and calling it by name needs a rule of its own.
            self._children(node.parts)
        elif kind in ("list", "pipeline", "compound", "if", "for", "while", "until"):
            self._children(getattr(node, "parts", None) or getattr(node, "list", None) or ())
        elif kind == "redirect":
            self._redirect(node)
        elif kind in ("commandsubstitution", "processsubstitution"):
            self.visit(node.command)
        elif kind in ("operator", "pipe", "reservedword", "word", "parameter", "tilde", "heredoc", "assignment"):
            self._nested(node)
        else:
            self.opaque = self.opaque or f"the shell construct `{kind}` is not understood"

    def _children(self, nodes) -> None:
        for child in nodes:
            self.visit(child)

    def _nested(self, node) -> None:
        """Substitutions inside a word run too."""
        for part in getattr(node, "parts", None) or ():
            if part.kind in ("commandsubstitution", "processsubstitution"):
                self.visit(part.command)
            elif part.kind == "parameter" and _RUNS_A_COMMAND.search(getattr(part, "value", "")):
                # `${x:-$(rm x)}`, `${a[$(rm x)]}`: the parser keeps a parameter's text whole, so
                # what its substitutions run is split out the old way, and the line is opaque.
                self.commands += _fallback_commands(part.value)
                self.opaque = self.opaque or "a parameter expansion holds a command substitution"
            else:
                self._nested(part)

    def _command(self, node) -> None:
        words: list[str] = []
        expanded: list[bool] = []
        expansions: list[Expansion | None] = []
        for part in node.parts:
            if part.kind in ("word", "assignment"):
                # An assignment's value is neither globbed nor brace-expanded; a word holding a
                # substitution is a run-time value (`_has_expansion`) as a whole.
                source = self._source(part) if part.kind == "word" else None
                if part.parts and not (source is not None and _only_quoting(source)):
                    source = None
                expansion = _expansion(source) if source is not None else None
                words.append(part.word)
                expanded.append(_has_expansion(part) or expansion is not None)
                if source is not None and _names_its_value(source):
                    expansion = _path_expansion(source)
                expansions.append(expansion)
                self._nested(part)
            elif part.kind == "redirect":
                self._redirect(part)
            else:
                self.visit(part)
        if words:
            self.commands.append(SimpleCommand(tuple(words), tuple(expanded), tuple(expansions)))

    def _source(self, node) -> str:
        """A word as written in the line, quotes and all."""
        start, end = node.pos
        return self.raw[start:end]

    def _redirect(self, node) -> None:
        kind = node.type
        target = node.output
        if kind in ("<<", "<<-", "<<<") or isinstance(target, int) or target is None:
            # A here-document or here-string, or a duplicated descriptor (2>&1): no file.
            if not isinstance(target, int) and target is not None:
                self._nested(target)
            heredoc = getattr(node, "heredoc", None)
            if heredoc is not None and _RUNS_A_COMMAND.search(heredoc.value):
                # The body of a here-document with an unquoted delimiter is expanded, and its
                # substitutions run (`cat <<EOF` then `$(rm x)`), but the parser keeps it as
                # text: what runs is split out the old way, for deny rules, and no allow rule
                # vouches for the line. (A quoted delimiter, whose body is literal, is unreadable
                # to the parser: opaque anyway.)
                self.commands += _fallback_commands(heredoc.value)
                self.opaque = self.opaque or "a here-document's body holds a command substitution"
            return
        self._nested(target)
        expansion = _expansion(self._source(target))
        path = None if _has_expansion(target) or expansion is not None else target.word
        if kind == "<&" or (kind == ">&" and path is not None and path.isdigit()):
            return
        if path in HARMLESS_TARGETS:
            return
        accesses = {"<": (Access.READ,), "<>": (Access.READ, Access.WRITE)}.get(kind, (Access.WRITE,))
        for access in accesses:
            self.redirections.append(Redirection(access, path, expansion))


def _has_expansion(node) -> bool:
    """A parameter, substitution, arithmetic or tilde expansion: the word's value is known at run
    time only."""
    return bool(getattr(node, "parts", None)) or "$" in node.word or node.word.startswith("~")


# How a word is read: each character with whether it is quoted (or escaped), i.e. literal.
_Chars = list[tuple[str, bool]]
# An unquoted `{x..y}` or `{x..y..step}` sequence, of integers or of letters.
_SEQUENCE = re.compile(r"(?P<first>-?\d+|[A-Za-z])\.\.(?P<last>-?\d+|[A-Za-z])(?:\.\.(?P<step>-?\d+))?")
# Characters escaped in a glob of tool_worker.denied's syntax to stand for themselves.
_GLOB_SPECIAL = frozenset("\\*?[]{}")
# A `$'...'` (ANSI-C) quote, or the start of a `$"..."` (translated) one.
_DOLLAR_QUOTE = re.compile(r"\$'(?:[^'\\]|\\.)*'|\$\"")
# The escapes of a `$'...'` quote's body, and those that stand for one character.
_ANSI_C_ESCAPE = re.compile(r"\\(?:x[0-9A-Fa-f]{0,2}|u[0-9A-Fa-f]{0,4}|U[0-9A-Fa-f]{0,8}|[0-7]{1,3}|c.?|.)", re.DOTALL)
_ANSI_C_SIMPLE = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                  "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


def _path_expansion(source: str) -> Expansion | None:
    """`_expansion` of what a word names as a path: the value of `--option=value`."""
    if _names_its_value(source):
        source = source.partition("=")[2]
    return _expansion(source)


def _names_its_value(source: str) -> bool:
    return source.startswith("-") and "=" in source


def _expansion(source: str) -> Expansion | None:
    """What the word written `source` may expand to as a path, when it holds an unquoted glob
    character or brace expansion; None when it holds none (or a `$` or backquote: a value known
    only at run time, which `_has_expansion` reports)."""
    if not _only_quoting(source):
        return None
    chars = _read_quotes(source)
    words = _expand_braces(chars)
    if words is None:
        return Expansion((), ("**",))
    if len(words) == 1 and not _has_glob(words[0]) and "$" not in source:
        return None  # no brace expansion and no glob: the word is what it says
    paths: list[str] = []
    globs: list[str] = []
    for word in words:
        glob = _glob_of(word)
        if glob is None:
            paths.append("".join(char for char, _ in word))
        else:
            globs.append(glob)
    return Expansion(tuple(dict.fromkeys(paths)), tuple(dict.fromkeys(globs)))


def _only_quoting(source: str) -> bool:
    """Whether every `$` of the word written `source` starts a `$'...'` or `$"..."` quote, and it
    holds no backquote: its value is known now, though the parser reads `$'secret/key'` as a
    parameter (`$secret/key`)."""
    return "`" not in source and "$" not in _DOLLAR_QUOTE.sub("", source)


def _read_quotes(source: str) -> _Chars:
    """The word's characters after quote removal, each with whether it was quoted."""
    chars: _Chars = []
    i = 0
    while i < len(source):
        char = source[i]
        if source.startswith("$'", i):
            # ANSI-C quoting: `$'secret/k\x65y'` is secret/key.
            end = i + 2
            while end < len(source) and source[end] != "'":
                end += 2 if source[end] == "\\" else 1
            chars += [(c, True) for c in _ansi_c(source[i + 2 : end])]
            i = end + 1
        elif source.startswith('$"', i):
            i += 1  # a translated string: as a double-quoted one (no catalog translates it)
        elif char == "\\":
            if i + 1 < len(source) and source[i + 1] != "\n":
                chars.append((source[i + 1], True))
            i += 2
        elif char == "'":
            end = source.find("'", i + 1)
            end = len(source) if end == -1 else end
            chars += [(c, True) for c in source[i + 1 : end]]
            i = end + 1
        elif char == '"':
            i += 1
            while i < len(source) and source[i] != '"':
                if source[i] == "\\" and i + 1 < len(source) and source[i + 1] in '$`"\\\n':
                    if source[i + 1] != "\n":
                        chars.append((source[i + 1], True))
                    i += 2
                else:
                    chars.append((source[i], True))
                    i += 1
            i += 1
        else:
            chars.append((char, False))
            i += 1
    return chars


def _ansi_c(body: str) -> str:
    """The text of a `$'...'` quote's body, its backslash escapes decoded as bash decodes them."""
    return _ANSI_C_ESCAPE.sub(_ansi_c_escape, body)


def _ansi_c_escape(match: re.Match[str]) -> str:
    escape = match[0][1:]
    if escape[0] in "xuU":
        if len(escape) == 1:
            return match[0]
        point = int(escape[1:], 16)
        # No path holds a lone surrogate or a point past Unicode (nor could it be encoded).
        return chr(point) if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF else "\ufffd"
    if escape[0].isdigit():
        return chr(int(escape, 8) & 0xFF)
    if escape[0] == "c":
        return chr(ord(escape[1]) & 0x1F) if len(escape) > 1 else match[0]
    return _ANSI_C_SIMPLE.get(escape, match[0])


def _expand_braces(chars: _Chars) -> list[_Chars] | None:
    """The words bash's brace expansion makes of a word (only unquoted braces count; `{a}` and
    `{}` are not expansions); None when there would be more than MAX_BRACE_WORDS."""
    start = 0
    while (found := _brace(chars, start)) is not None:
        opening, closing, commas = found
        inner = chars[opening + 1 : closing]
        text = "".join(char for char, _ in inner)
        if commas:
            middles: list[_Chars] = []
            for begin, end in zip((opening, *commas), (*commas, closing), strict=True):
                expanded = _expand_braces(chars[begin + 1 : end])
                if expanded is None or len(middles) + len(expanded) > MAX_BRACE_WORDS:
                    return None
                middles += expanded
        elif not any(quoted for _, quoted in inner) and (sequence := _sequence(text)) is not None:
            # Past MAX_BRACE_WORDS, `*`: none of its words holds a `/`.
            middles = [[(char, True) for char in word] for word in sequence] if sequence else [[("*", False)]]
        else:
            start = opening + 1  # `{a}`: not an expansion; a later brace may be
            continue
        rests = _expand_braces(chars[closing + 1 :])
        if rests is None or len(middles) * len(rests) > MAX_BRACE_WORDS:
            return None
        return [chars[:opening] + middle + rest for middle in middles for rest in rests]
    return [chars]


def _sequence(text: str) -> list[str] | None:
    """The words of a `{x..y}` sequence as bash makes them (`{1..3}`, `{01..10..3}`, `{a..e}`);
    None when `text` is no sequence (`{1..a}`), empty past MAX_BRACE_WORDS words."""
    match = _SEQUENCE.fullmatch(text)
    if match is None or match["first"].isalpha() != match["last"].isalpha():
        return None
    first, last, step = match["first"], match["last"], abs(int(match["step"] or 1)) or 1
    start, end = (ord(first), ord(last)) if first.isalpha() else (int(first), int(last))
    if abs(end - start) // step >= MAX_BRACE_WORDS:
        return []
    values = range(start, end + 1, step) if start <= end else range(start, end - 1, -step)
    if first.isalpha():
        return [chr(value) for value in values]
    width = max(len(first), len(last)) if re.match(r"-?0\d", first) or re.match(r"-?0\d", last) else 0
    return [f"{value:0{width}d}" for value in values]


def _brace(chars: _Chars, start: int) -> tuple[int, int, list[int]] | None:
    """The first unquoted `{` from `start` that has its closing `}`: their places, and those of
    the commas between them at its own level."""
    for opening in range(start, len(chars)):
        if chars[opening] != ("{", False):
            continue
        depth, commas = 0, []
        for index in range(opening + 1, len(chars)):
            char, quoted = chars[index]
            if quoted:
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    return opening, index, commas
                depth -= 1
            elif char == "," and depth == 0:
                commas.append(index)
    return None


def _has_glob(word: _Chars) -> bool:
    return any(not quoted and (char in "*?[" or _extended(word, index)) for index, (char, quoted) in enumerate(word))


def _extended(word: _Chars, index: int) -> bool:
    """An extended glob's `(` (`@(a|b)`, `+(x)`, `!(x)`; `?(` and `*(` are globs already)."""
    return word[index] == ("(", False) and index > 0 and not word[index - 1][1] and word[index - 1][0] in "+@!"


def _glob_of(word: _Chars) -> str | None:
    """The glob (tool_worker.denied's syntax) of the paths a word may name, or None when it holds
    no wildcard. A component with an unquoted `[` (a class, where bash and the glob syntax may
    disagree on where it ends) or an extended glob may be any name: `*`."""
    if not _has_glob(word):
        return None
    components: list[str] = []
    current: list[str] = []
    anything = False
    for index, (char, quoted) in enumerate((*word, ("/", True))):
        if char == "/":
            components.append("*" if anything else "".join(current))
            current, anything = [], False
        elif (not quoted and char == "[") or (index < len(word) and _extended(word, index)):
            anything = True
        elif not quoted and char in "*?":
            current.append(char)
        else:
            current.append("\\" + char if char in _GLOB_SPECIAL else char)
    return "/".join(components)
