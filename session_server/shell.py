"""What a shell command line does, as far as permission rules care: its simple commands, the files
its redirections read and write, and the options of its commands that write or run something.

A real parser (`bashlex`) reads the line, so quoting, pipes, lists, subshells, compound commands
and substitutions are seen as bash sees them: `git log $(rm -rf x)` holds two commands, and
`echo 'a; rm x'` one. What the parser cannot read, or what depends on run-time values (a
redirection to `$OUT`), is marked `opaque`: no allow rule can vouch for it, while deny and ask
rules still match the raw text.

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

_GLOB_CHARS = re.compile(r"[*?\[]")


class Access(enum.StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class SimpleCommand:
    """One simple command: its words as the program receives them (quotes removed), assignments
    first, and for each word whether it holds an expansion whose value is only known at run time."""

    words: tuple[str, ...]
    expanded: tuple[bool, ...]

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
        `--option=value`. Deny rules on paths match them; they are not proof of a read."""
        for command in self.commands:
            for word in command.words[1:]:
                if word.startswith("-"):
                    _, equals, value = word.partition("=")
                    if equals and value:
                        yield value
                elif word:
                    yield word.partition("=")[2] if _is_assignment(word) else word


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
    walker = _Walker()
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


def _fallback_commands(raw: str) -> tuple[SimpleCommand, ...]:
    pieces = [piece.split() for piece in _SEPARATOR.split(raw)]
    return tuple(SimpleCommand(tuple(words), (True,) * len(words)) for words in pieces if words)


class _Walker:
    def __init__(self) -> None:
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
            else:
                self._nested(part)

    def _command(self, node) -> None:
        words: list[str] = []
        expanded: list[bool] = []
        for part in node.parts:
            if part.kind in ("word", "assignment"):
                words.append(part.word)
                expanded.append(_has_expansion(part))
                self._nested(part)
            elif part.kind == "redirect":
                self._redirect(part)
            else:
                self.visit(part)
        if words:
            self.commands.append(SimpleCommand(tuple(words), tuple(expanded)))

    def _redirect(self, node) -> None:
        kind = node.type
        target = node.output
        if kind in ("<<", "<<-", "<<<") or isinstance(target, int) or target is None:
            # A here-document or here-string, or a duplicated descriptor (2>&1): no file.
            if not isinstance(target, int) and target is not None:
                self._nested(target)
            return
        self._nested(target)
        path = None if _has_expansion(target) or _GLOB_CHARS.search(target.word) else target.word
        if kind == "<&" or (kind == ">&" and path is not None and path.isdigit()):
            return
        if path in HARMLESS_TARGETS:
            return
        accesses = {"<": (Access.READ,), "<>": (Access.READ, Access.WRITE)}.get(kind, (Access.WRITE,))
        for access in accesses:
            self.redirections.append(Redirection(access, path))


def _has_expansion(node) -> bool:
    """A parameter, substitution, arithmetic or tilde expansion: the word's value is known at run
    time only."""
    return bool(getattr(node, "parts", None)) or "$" in node.word or node.word.startswith("~")
