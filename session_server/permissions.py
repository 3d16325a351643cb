"""Permission policies: which tool calls run, which are refused, which wait for a confirmation.

Pure domain logic: no grpc, no I/O, no clock.

A rule is `tool` (every call of the tool) or `tool(glob)`: calls whose *subject* matches the glob.
The subject of a call is its main argument, given per tool by `SUBJECTS`:

| tool                      | subject argument(s)             | kind    |
| ------------------------- | ------------------------------- | ------- |
| bash                      | command                         | command |
| execute                   | argv (joined as a shell line)   | command |
| read, write, edit         | file_path (or path)             | path    |
| delete                    | path (or file_path)             | path    |
| move, copy                | source and destination, both    | path    |
| ls, list_files            | path ("." when not given)       | path    |
| grep, glob                | pattern (or path)               | text    |
| search                    | query                           | text    |

Globs are fnmatch-style. For `command` and `text` subjects `*` matches anything, `/` included
(`bash(git *)`, `grep(*password*)`). For `path` subjects `*` and `?` stay within one path
segment and `**` crosses segments (`write(src/**)`, `read(**/*.env)`); `src/**` also matches
`src` itself. Paths are normalised first: an absolute path inside the workspace is made
relative to it, and `.` and `..` are resolved, so `src/../secrets/key` is `secrets/key`.

A command is split at shell control operators (`;`, `&`, `&&`, `|`, `||`, newline) into
segments. A deny or ask rule matches when it matches the whole command or any segment; an allow
rule set matches only when every segment is matched by some allow glob, and never a command that
substitutes another (`$(...)`, backticks, `<(...)`): `bash(git *)` allows `git status` but not
`git status && rm -rf build`. The split ignores quoting, which can only make it stricter. Move
and copy work the same way on their two paths: deny if either path matches, allow only if both
do.

Precedence: deny beats allow beats ask beats the default action (ALLOW unless configured).
Tools no call of which could ever run (a bare deny rule, or a DENY default and no allow or ask
rule naming the tool) are not offered to the model at all (`offers`).
"""

from __future__ import annotations

import enum
import functools
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from tool_worker.tools.globs import translate_glob

DEFAULT_CONFIRMATION_TIMEOUT = 60.0


class Action(enum.StrEnum):
    """What a rule does to a matching call. Mirrors codelane.v1.PermissionAction."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


class SubjectKind(enum.StrEnum):
    COMMAND = "command"
    PATH = "path"
    TEXT = "text"


@dataclass(frozen=True)
class SubjectArgument:
    """Where to find one subject of a call: the first of `names` the call has, else `default`."""

    names: tuple[str, ...]
    kind: SubjectKind
    default: str | None = None


_COMMAND = SubjectKind.COMMAND
_PATH = SubjectKind.PATH
_TEXT = SubjectKind.TEXT
_FILE = (SubjectArgument(("file_path", "path"), _PATH),)
_LISTING = (SubjectArgument(("path",), _PATH, "."),)
_TRANSFER = (SubjectArgument(("source",), _PATH), SubjectArgument(("destination",), _PATH))
_PATTERN = (SubjectArgument(("pattern", "path"), _TEXT),)

# The subject arguments of each built-in tool; rules with a glob are refused for other tools.
SUBJECTS: Mapping[str, tuple[SubjectArgument, ...]] = {
    "bash": (SubjectArgument(("command",), _COMMAND),),
    "execute": (SubjectArgument(("argv",), _COMMAND),),
    "read": _FILE,
    "write": _FILE,
    "edit": _FILE,
    "delete": (SubjectArgument(("path", "file_path"), _PATH),),
    "move": _TRANSFER,
    "copy": _TRANSFER,
    "ls": _LISTING,
    "list_files": _LISTING,
    "grep": _PATTERN,
    "glob": _PATTERN,
    "search": (SubjectArgument(("query",), _TEXT),),
}

_RULE = re.compile(r"(?P<tool>[A-Za-z_][A-Za-z0-9_.-]*)(?:\((?P<glob>.*)\))?", re.DOTALL)
_SHELL_SEPARATOR = re.compile(r"&&|\|\||[;&|\n]")
_SHELL_SUBSTITUTION = re.compile(r"\$\(|`|<\(|>\(")


class PolicyError(ValueError):
    """A policy field is invalid; `field` names it relative to the policy (e.g. "allow[2]")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Rule:
    """One parsed rule; `source` says where it was written, e.g. "deny[0]"."""

    text: str
    tool: str
    glob: str | None
    source: str

    @classmethod
    def parse(cls, text: str, source: str) -> Rule:
        """Raises PolicyError(source, ...) when `text` is not `tool` or `tool(glob)`."""
        stripped = text.strip()
        match = _RULE.fullmatch(stripped)
        if match is None:
            raise PolicyError(
                source, f"{text!r} is not a rule: write `tool` or `tool(glob)`, e.g. `bash`, `bash(git *)`, "
                "`write(src/**)`"
            )
        tool, glob = match["tool"], match["glob"]
        if glob is not None and not glob.strip():
            raise PolicyError(source, f"{text!r} has an empty glob: write `{tool}` to match every call of {tool}")
        if glob is not None and tool not in SUBJECTS:
            raise PolicyError(
                source, f"{text!r}: {tool} has no argument a glob can match (globs work for "
                f"{', '.join(sorted(SUBJECTS))}); write the bare rule `{tool}`"
            )
        return cls(stripped, tool, glob.strip() if glob is not None else None, source)

    def matches_piece(self, kind: SubjectKind, value: str) -> bool:
        assert self.glob is not None
        if kind is SubjectKind.PATH:
            return _path_glob(_normalise_rule_path(self.glob)).fullmatch(value) is not None
        return fnmatchcase(value, self.glob)


@dataclass(frozen=True)
class Decision:
    action: Action
    # The rule that decided; None when the default action applied.
    rule: Rule | None = None

    def describe(self) -> str:
        """How the policy reached the decision, for error texts and events."""
        if self.rule is None:
            return f"the policy's default action is {self.action.value}"
        return f"rule {self.rule.source} `{self.rule.text}`"


@dataclass(frozen=True)
class _Subject:
    kind: SubjectKind
    # The whole value: a path (normalised), a command line, a text.
    whole: str
    # What allow globs must each match: the command's segments, or just the whole value.
    pieces: tuple[str, ...]
    # A command substituting another: allow globs cannot vouch for it.
    opaque: bool = False


@dataclass(frozen=True)
class PermissionPolicy:
    """A session's permission policy. The default instance allows every call."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    ask: tuple[Rule, ...] = ()
    default_action: Action = Action.ALLOW
    confirmation_timeout: float = DEFAULT_CONFIRMATION_TIMEOUT
    timeout_action: Action = Action.DENY
    # Bare deny rules by tool, worked out once.
    _denied_tools: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.timeout_action not in (Action.ALLOW, Action.DENY):
            raise PolicyError("timeout_action", f"{str(self.timeout_action)!r} must be allow or deny")
        object.__setattr__(self, "_denied_tools", frozenset(r.tool for r in self.deny if r.glob is None))

    @classmethod
    def parse(
        cls,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        ask: Sequence[str] = (),
        default_action: Action | str = Action.ALLOW,
        confirmation_timeout: float = DEFAULT_CONFIRMATION_TIMEOUT,
        timeout_action: Action | str = Action.DENY,
    ) -> PermissionPolicy:
        """Raises PolicyError naming the bad field, e.g. "allow[1]"."""
        return cls(
            allow=_parse_rules(allow, "allow"),
            deny=_parse_rules(deny, "deny"),
            ask=_parse_rules(ask, "ask"),
            default_action=_action(default_action, "default_action"),
            confirmation_timeout=float(confirmation_timeout),
            timeout_action=_action(timeout_action, "timeout_action"),
        )

    @property
    def allows_everything(self) -> bool:
        return not (self.allow or self.deny or self.ask) and self.default_action is Action.ALLOW

    def offers(self, tool: str) -> bool:
        """False when no call of `tool` could ever run, so the model is not even told of it."""
        if tool in self._denied_tools:
            return False
        if self.default_action is Action.DENY:
            return any(r.tool == tool for r in (*self.allow, *self.ask))
        return True

    def decide(self, tool: str, arguments: Mapping[str, Any], workspace: str | None = None) -> Decision:
        """The action for one call. `workspace` makes absolute paths inside it relative."""
        if self.allows_everything:
            return Decision(Action.ALLOW)
        subjects = call_subjects(tool, arguments, workspace)
        rule = _any_match(self.deny, tool, subjects)
        if rule is not None:
            return Decision(Action.DENY, rule)
        rule = _every_match(self.allow, tool, subjects)
        if rule is not None:
            return Decision(Action.ALLOW, rule)
        rule = _any_match(self.ask, tool, subjects)
        if rule is not None:
            return Decision(Action.ASK, rule)
        return Decision(self.default_action)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow": [r.text for r in self.allow],
            "deny": [r.text for r in self.deny],
            "ask": [r.text for r in self.ask],
            "default_action": self.default_action.value,
            "confirmation_timeout": self.confirmation_timeout,
            "timeout_action": self.timeout_action.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermissionPolicy:
        return cls.parse(
            allow=data.get("allow", ()),
            deny=data.get("deny", ()),
            ask=data.get("ask", ()),
            default_action=data.get("default_action", Action.ALLOW),
            confirmation_timeout=data.get("confirmation_timeout", DEFAULT_CONFIRMATION_TIMEOUT),
            timeout_action=data.get("timeout_action", Action.DENY),
        )


def call_subjects(tool: str, arguments: Mapping[str, Any], workspace: str | None = None) -> list[_Subject]:
    """The subjects of a call, per `SUBJECTS`; empty for tools without one or missing arguments."""
    subjects = []
    for argument in SUBJECTS.get(tool, ()):
        value = next((arguments[n] for n in argument.names if arguments.get(n) not in (None, "")), argument.default)
        if value is None:
            continue
        if argument.kind is SubjectKind.COMMAND:
            command = shlex.join(str(v) for v in value) if isinstance(value, list) else str(value)
            subjects.append(_command_subject(command))
        elif argument.kind is SubjectKind.PATH:
            path = _normalise_path(str(value), workspace)
            subjects.append(_Subject(SubjectKind.PATH, path, (path,)))
        else:
            subjects.append(_Subject(SubjectKind.TEXT, str(value), (str(value),)))
    return subjects


def _command_subject(command: str) -> _Subject:
    whole = command.strip()
    pieces = tuple(p.strip() for p in _SHELL_SEPARATOR.split(whole) if p.strip())
    return _Subject(SubjectKind.COMMAND, whole, pieces or (whole,), _SHELL_SUBSTITUTION.search(whole) is not None)


def _any_match(rules: Iterable[Rule], tool: str, subjects: list[_Subject]) -> Rule | None:
    """The first rule matching the call at all: bare, or its glob on any subject or piece."""
    for rule in rules:
        if rule.tool != tool:
            continue
        if rule.glob is None:
            return rule
        for subject in subjects:
            if any(rule.matches_piece(subject.kind, v) for v in {subject.whole, *subject.pieces}):
                return rule
    return None


def _every_match(rules: Sequence[Rule], tool: str, subjects: list[_Subject]) -> Rule | None:
    """A rule set vouching for the whole call: a bare rule, or globs matching every piece."""
    mine = [r for r in rules if r.tool == tool]
    bare = next((r for r in mine if r.glob is None), None)
    if bare is not None:
        return bare
    if not subjects or any(s.opaque for s in subjects):
        return None
    first: Rule | None = None
    for subject in subjects:
        for piece in subject.pieces:
            rule = next((r for r in mine if r.matches_piece(subject.kind, piece)), None)
            if rule is None:
                return None
            first = first or rule
    return first


def _parse_rules(texts: Sequence[str], name: str) -> tuple[Rule, ...]:
    if isinstance(texts, str):
        raise PolicyError(name, "must be a list of rules, not one string")
    return tuple(Rule.parse(text, f"{name}[{i}]") for i, text in enumerate(texts))


def _action(value: Action | str, name: str) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise PolicyError(name, f"{value!r} is not one of allow, deny, ask") from None


def _normalise_path(path: str, workspace: str | None) -> str:
    path = path.strip()
    if workspace and path.startswith("/"):
        root = posixpath.normpath(workspace)
        normal = posixpath.normpath(path)
        if normal == root:
            return "."
        if normal.startswith(root.rstrip("/") + "/"):
            path = normal[len(root.rstrip("/")) + 1:]
    normal = posixpath.normpath(path) if path else "."
    # normpath keeps a leading "//"; one slash is the same directory.
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def _normalise_rule_path(glob: str) -> str:
    while glob.startswith("./"):
        glob = glob[2:]
    return glob or "."


@functools.lru_cache(maxsize=1024)
def _path_glob(glob: str) -> re.Pattern[str]:
    """A path glob as a regex, with the tools' glob rules (`*` and `?` within a segment, `**`
    across segments, `[...]`, `{a,b}`); `dir/**` also matches `dir` itself."""
    if glob.endswith("/**"):
        return re.compile(f"{translate_glob(glob[:-3])}(?:/.*)?", re.DOTALL)
    return re.compile(translate_glob(glob), re.DOTALL)
