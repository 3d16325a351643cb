"""Permission policies: which tool calls run, which are refused, which wait for a confirmation.

Pure domain logic: no grpc, no clock. The only I/O is resolving symlinks of the paths a call
names, exactly as the tools' sandbox (`tool_worker.sandbox`) resolves them.

A rule is `tool` (every call of the tool) or `tool(glob)`: calls whose *subject* matches the glob.
The subject of a call is its main argument, given per tool by `SUBJECTS`:

| tool                      | subject argument(s)             | kind    |
| ------------------------- | ------------------------------- | ------- |
| bash                      | command                         | command |
| execute                   | argv (joined with spaces)       | command |
| read, write, edit         | file_path (or path)             | path    |
| delete                    | path (or file_path)             | path    |
| move, copy                | source and destination, both    | path    |
| ls, list_files            | path ("." when not given)       | path    |
| grep, glob                | pattern (or path)               | text    |
| search                    | query                           | text    |

Globs are fnmatch-style. For `command` and `text` subjects `*` matches anything, `/` included
(`bash(git *)`, `grep(*password*)`). For `path` subjects the glob syntax is that of
`tool_worker.denied` (`*` and `?` within one segment, `**` across segments, `write(src/**)`,
`read(**/*.env)`); `src/**` also matches `src` itself, and a glob ending in `/` is the directory
and everything in it (`secret/` is `secret/**`). Paths are normalised first (an absolute path
inside the workspace is made relative to it; `.` and `..` are resolved) and checked twice: as
named, and with every symlink resolved. A deny or ask rule matches when either form, or a
directory above it, matches; an allow rule only when both forms do. An absolute glob is placed in
the workspace before matching (`_placed`): `/ws/src/**` matches the workspace's `src/**`, as does
`/link-to-ws/src/**` or `/*/src/**`, and still matches absolute paths outside the workspace.

Path rules protect what a call touches, not only the tool named: `read(glob)` and `write(glob)`
deny and ask rules apply to every tool, by the paths the call reads or writes (`copy` reads its
source and writes its destination, `edit` reads and writes, `grep`, `glob`, `ls`, `list_files`
and `search` read their directory, a shell command reads and writes its redirections' files and
may read any word it mentions). A shell word the shell globs (`cat s*/key`) may name any path its
glob matches: a rule matches it when it may match such a path (`Rule.denies_glob`, which may say
yes where no path would, never the reverse; past MAX_GLOB_WORK in one decision, the rules left
are taken to apply). A brace word (`{s,}ecret`) names each word it stands for. Listing and search
tools also leave the paths denied by `read(glob)` out of their results: those globs travel with
each call (`denied_paths`), and so do those of `read(glob)` ask rules with each call that was not
confirmed (`grep .` would otherwise read, unasked, what only a call naming it asks for).

Shell commands (`bash`) are read with a real parser (`session_server.shell`). Each simple
command, in a list, a pipeline, a subshell or a substitution, is a piece of its own:
- a deny or ask rule matches when it matches the whole line or any piece;
- an allow rule set vouches for a line only when every piece is matched by some allow glob,
  every file redirection by an allow `write(glob)` (output) or `read(glob)` (input) rule, and
  nothing in it is known only at run time where a wildcard stands (a `$VAR`, a `> $OUT`, a `~`,
  an unquoted glob or brace word: `s*`, `[s]ecret`, `{a,b}`; a quoted `'*.py'` is a plain word);
- a prefix rule never covers an option that writes or runs something where its wildcard stands:
  `bash(git *)` allows `git status` but not `git status > x`, `git -c alias.x=... x`,
  `git log --output=x` or `git status && rm -rf build` (`session_server.shell.WRITING_OPTIONS`).
Move and copy work the same way on their two paths: deny if either path matches, allow only if
both do.

Precedence: deny beats allow beats ask beats the default action (ALLOW unless configured).
Tools no call of which could ever run (a bare deny rule, or a DENY default and no allow or ask
rule naming the tool) are not offered to the model at all (`offers`). A rule naming a tool the
server does not know is refused when the policy is parsed with `known_tools`.
"""

from __future__ import annotations

import enum
import functools
import os
import posixpath
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from session_server.shell import Access, ShellLine, SimpleCommand, argv_line, parse_shell, writing_option
from tool_worker.denied import (
    MAX_BRACE_ALTERNATIVES,
    ancestors_and_self,
    compile_path_glob,
    globs_within,
    literal_glob,
    may_deny,
    normalise_relative,
    relative_to_root,
)
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import ToolFailure
from tool_worker.tools.globs import Budget, expand_braces

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

# Rules on these tools' globs also apply to every other tool, by the paths a call reads or writes.
ACCESS_RULES = {"read": Access.READ, "write": Access.WRITE}

_RULE = re.compile(r"(?P<tool>[A-Za-z_][A-Za-z0-9_.-]*)(?:\((?P<glob>.*)\))?", re.DOTALL)
# Where a command glob's wildcards start: words past it are covered by a wildcard.
_WILDCARD = re.compile(r"[*?\[]")
# What makes a path glob more than one path (tool_worker.denied's syntax).
_PATH_WILDCARD = re.compile(r"[*?\[{\\]")
# A wildcard of such a glob, and an escaped character (which stands for itself).
_UNESCAPED_WILDCARD = re.compile(r"(?<!\\)(?:\\\\)*[*?\[{]")
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
# Levels of `{a,b}` alternatives nested in a path rule's glob (a real rule needs one or two).
MAX_GLOB_BRACE_DEPTH = 16
# Pairs of states of glob automata compared to find which path rules a call's shell glob words
# may meet, at most (tool_worker.tools.globs.globs_overlap; a few hundred for a word and a rule,
# about 50 ms in all here); past it, the rules left are taken to apply.
MAX_GLOB_WORK = 50_000
# Entries of a directory a write would change that are matched against a rule below it, at most
# (listed on the event loop: about 1 us each here; past it the rule is taken to apply).
MAX_LISTED_FOR_RULES = 50_000


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
    # A rule placed in a workspace (`_placed`): the rule as written.
    origin: Rule | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, source: str, known_tools: Collection[str] | None = None) -> Rule:
        """Raises PolicyError(source, ...) when `text` is not `tool` or `tool(glob)`, or (given
        `known_tools`) names a tool the server does not have."""
        stripped = text.strip()
        match = _RULE.fullmatch(stripped)
        if match is None:
            raise PolicyError(
                source, f"{text!r} is not a rule: write `tool` or `tool(glob)`, e.g. `bash`, `bash(git *)`, "
                "`write(src/**)`"
            )
        tool, glob = match["tool"], match["glob"]
        if known_tools is not None and tool not in known_tools:
            raise PolicyError(
                source, f"{text!r} names an unknown tool {tool!r} (tool names are case-sensitive); known tools: "
                f"{', '.join(sorted(known_tools))}"
            )
        if glob is not None and not glob.strip():
            raise PolicyError(source, f"{text!r} has an empty glob: write `{tool}` to match every call of {tool}")
        if glob is not None and tool not in SUBJECTS:
            raise PolicyError(
                source, f"{text!r}: {tool} has no argument a glob can match (globs work for "
                f"{', '.join(sorted(SUBJECTS))}); write the bare rule `{tool}`"
            )
        if glob is not None and SUBJECTS[tool][0].kind is SubjectKind.PATH:
            glob = _normalise_rule_path(glob.strip())
        return cls(stripped, tool, glob.strip() if glob is not None else None, source)

    def matches_path(self, path: str) -> bool:
        assert self.glob is not None
        return compile_path_glob(self.glob).fullmatch(path) is not None

    def allows_path(self, path: str) -> bool:
        """What an allow rule vouches for: a relative glob names paths of the workspace only, where
        `**/*.log` (whose `**` matches `..` and a leading `/` too) also matched /etc/x.log and
        ../../x.log."""
        assert self.glob is not None
        if not self.glob.startswith("/") and (path.startswith("/") or path == ".." or path.startswith("../")):
            return False
        return self.matches_path(path)

    def denies_path(self, path: str) -> bool:
        """The path, or a directory above it, matches: what a deny or ask rule protects."""
        return any(self.matches_path(candidate) for candidate in ancestors_and_self(path))

    def denies_glob(self, pattern: str, budget: Budget) -> bool:
        """A path the glob `pattern` matches (what a shell glob word may expand to), or a
        directory above it, may match (or `budget` is spent: see MAX_GLOB_WORK)."""
        assert self.glob is not None
        return may_deny(pattern, self.glob, budget)

    def denies_inside(self, path: str, inside: _Inside) -> bool:
        """A path below `path` matches: a write to a directory (deleting, moving or replacing it)
        changes what it holds. Decided from the glob when it names such a path outright, else
        from the directory's listing (see _Inside)."""
        assert self.glob is not None
        if path.startswith("/") or path.startswith("../"):
            return False  # outside the workspace: no rule of it names a path below
        prefix = "" if path == "." else f"{path}/"
        wildcard = _PATH_WILDCARD.search(self.glob)
        if wildcard is None:
            return self.glob.startswith(prefix) and self.glob != path
        literal = self.glob[: wildcard.start()]
        if not (literal.startswith(prefix) or prefix.startswith(literal)):
            return False  # the glob's fixed start is elsewhere
        listed = inside.paths(path)
        return listed is None or any(self.matches_path(below) for below in listed)

    def matches_text(self, value: str) -> bool:
        assert self.glob is not None
        return fnmatchcase(value, self.glob)

    def covers(self, command: SimpleCommand) -> bool:
        """An allow glob vouching for one simple command: the glob matches its text, and no word
        where the glob's wildcard stands writes, runs something, or is known only at run time."""
        assert self.glob is not None
        if not fnmatchcase(command.text, self.glob):
            return False
        wildcard = _WILDCARD.search(self.glob)
        literal = wildcard.start() if wildcard else len(self.glob)
        offset = 0
        for word, expanded in zip(command.words, command.expanded, strict=True):
            end = offset + len(word)
            if end > literal and (expanded or writing_option(command, word)):
                return False
            offset = end + 1
        return True


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
    # PATH: the path as named (normalised) and, when it differs, with symlinks resolved.
    # TEXT: the value. COMMAND: the raw command line.
    forms: tuple[str, ...]
    # COMMAND only: the parsed line.
    shell: ShellLine | None = None
    # PATH only: the call writes it (what a directory holds changes with it).
    written: bool = False


class _Inside:
    """What the directories a call writes hold, for rules that name paths below them: each
    listed once per decision, relative to the workspace. A listing past MAX_LISTED_FOR_RULES
    entries is None: the rule is taken to apply (a refusal, or a question, rather than a guess).
    Listed on the event loop: a directory's delete or move, with a write rule whose glob could
    reach inside it, costs a walk of the directory (10,000 entries took 11 ms here)."""

    def __init__(self, workspace: str | None, budget: Budget | None = None) -> None:
        self._workspace = workspace
        self._listed: dict[str, tuple[str, ...] | None] = {}
        # What the decision may still spend on shell glob words (MAX_GLOB_WORK).
        self.budget = budget or Budget(MAX_GLOB_WORK)

    def paths(self, path: str) -> tuple[str, ...] | None:
        if path not in self._listed:
            self._listed[path] = self._list(path)
        return self._listed[path]

    @functools.cached_property
    def _root(self) -> str | None:
        return os.path.realpath(self._workspace) if self._workspace else None

    def _list(self, path: str) -> tuple[str, ...] | None:
        root = self._root
        if root is None:
            return None  # nothing to look at: assume the worst
        directory = os.path.join(root, path)
        if os.path.islink(directory) or not os.path.isdir(directory):
            return ()
        found: list[str] = []
        for parent, names, files in os.walk(directory):
            base = relative_to_root(root, parent)
            for name in (*names, *files):
                if len(found) == MAX_LISTED_FOR_RULES:
                    return None
                found.append(name if base in (None, ".") else f"{base}/{name}")
        return tuple(found)


@dataclass(frozen=True)
class _Call:
    """What the rules look at in one call."""

    tool: str
    subjects: tuple[_Subject, ...]
    # Every path the call reads or writes (or, for a shell, may), each in its forms.
    accesses: tuple[tuple[Access, tuple[str, ...]], ...]
    # Shell only: globs of the paths its glob words may read or write, each in its forms.
    globs: tuple[tuple[Access, tuple[str, ...]], ...] = ()


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
    # The deny, allow and ask rules placed in a workspace (`_place_all`), by workspace: placing
    # absolute rules resolves paths (an lstat per component), which every call's decision paid
    # (20 absolute rules: 220 -> 650-980 us a decision). A policy lives for a turn (settings are
    # read at its start), and what placing resolves lies outside the workspace, where calls
    # write nothing.
    _placed: dict[str | None, tuple[tuple[Rule, ...], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

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
        known_tools: Collection[str] | None = None,
        stored: bool = False,
    ) -> PermissionPolicy:
        """Raises PolicyError naming the bad field, e.g. "allow[1]". With `known_tools`, a rule
        naming any other tool is an error (`--deny Bash` would otherwise deny nothing).
        `stored`: a policy read back as a server (this one or an older one) accepted it, whose
        path globs are not checked again: every RPC reading its session would fail."""
        policy = cls(
            allow=_parse_rules(allow, "allow", known_tools),
            deny=_parse_rules(deny, "deny", known_tools),
            ask=_parse_rules(ask, "ask", known_tools),
            default_action=_action(default_action, "default_action"),
            confirmation_timeout=float(confirmation_timeout),
            timeout_action=_action(timeout_action, "timeout_action"),
        )
        if not stored:
            for rule in (*policy.allow, *policy.deny, *policy.ask):
                if rule.glob is not None and SUBJECTS[rule.tool][0].kind is SubjectKind.PATH:
                    _check_path_glob(rule.glob, rule.text, rule.source)
        return policy

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

    def denied_paths(self, workspace: str | None = None, *, confirmed: bool = True) -> tuple[str, ...]:
        """The globs of the `read(glob)` deny rules, relative to the workspace: what listing and
        search tools leave out of their results (the syntax of `tool_worker.denied`). Unless the
        call was `confirmed`, those of the `read(glob)` ask rules too: a grep or copy of the
        directory above what an ask rule names reads it, and only a call naming it asks."""
        globs = []
        for rule in self.deny if confirmed else (*self.deny, *self.ask):
            if rule.tool == "read" and rule.glob is not None:
                for placed in _placed(rule, workspace, covering=True):
                    assert placed.glob is not None
                    if workspace and placed.glob.startswith("/"):
                        continue  # outside the workspace: no tool lists it anyway
                    globs.append(placed.glob)
        return tuple(dict.fromkeys(globs))

    def decide(self, tool: str, arguments: Mapping[str, Any], workspace: str | None = None) -> Decision:
        """The action for one call. `workspace` makes absolute paths inside it relative, and lets
        symlinks be resolved as the tools will resolve them."""
        if self.allows_everything:
            return Decision(Action.ALLOW)
        call = _describe_call(tool, arguments, workspace)
        inside = _Inside(workspace, Budget(MAX_GLOB_WORK))
        deny, allow, ask = self._placed_in(workspace)
        rule = _any_match(deny, call, inside)
        if rule is not None:
            return Decision(Action.DENY, rule.origin or rule)
        rule = _every_match(allow, call, workspace)
        if rule is not None:
            return Decision(Action.ALLOW, rule.origin or rule)
        rule = _any_match(ask, call, inside)
        if rule is not None:
            return Decision(Action.ASK, rule.origin or rule)
        return Decision(self.default_action)

    def _placed_in(self, workspace: str | None) -> tuple[tuple[Rule, ...], ...]:
        placed = self._placed.get(workspace)
        if placed is None:
            placed = self._placed[workspace] = (_place_all(self.deny, workspace, covering=True),
                                                _place_all(self.allow, workspace, covering=False),
                                                _place_all(self.ask, workspace, covering=True))
        return placed

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
            stored=True,
        )


# What each tool reads and writes, by subject argument (in SUBJECTS order).
_ACCESSES: Mapping[str, tuple[tuple[Access, ...], ...]] = {
    "read": ((Access.READ,),),
    "write": ((Access.WRITE,),),
    "edit": ((Access.READ, Access.WRITE),),
    "delete": ((Access.WRITE,),),
    # A moved file is read under its new name: moving is reading the source, as copying is.
    "move": ((Access.READ, Access.WRITE), (Access.WRITE,)),
    "copy": ((Access.READ,), (Access.WRITE,)),
    "ls": ((Access.READ,),),
    "list_files": ((Access.READ,),),
}
# Tools that read a directory whose argument is not their subject.
_DIRECTORY_READERS = frozenset({"grep", "glob", "search"})


def _describe_call(tool: str, arguments: Mapping[str, Any], workspace: str | None) -> _Call:
    subjects: list[_Subject] = []
    accesses: list[tuple[Access, tuple[str, ...]]] = []
    globs: list[tuple[Access, tuple[str, ...]]] = []
    starts: dict[str, tuple[str, ...]] = {}  # the forms of glob words' fixed starts, found once
    for position, argument in enumerate(SUBJECTS.get(tool, ())):
        value = next((arguments[n] for n in argument.names if arguments.get(n) not in (None, "")), argument.default)
        if value is None:
            continue
        if argument.kind is SubjectKind.COMMAND:
            shell = argv_line(value) if isinstance(value, list) else parse_shell(str(value))
            subjects.append(_Subject(SubjectKind.COMMAND, (shell.raw,), shell))
            # A relative path is also checked from each directory the line's `cd`s lead to.
            directories = shell.directories()
            if directories is None:
                globs += [(Access.READ, ("**",)), (Access.WRITE, ("**",))]
                directories = ()
            for redirection in shell.redirections:
                if redirection.target is not None:
                    accesses += [(redirection.access, _path_forms(p, workspace))
                                 for p in _from_each(redirection.target, directories)]
                if redirection.expansion is not None:
                    accesses += [(redirection.access, _path_forms(p, workspace))
                                 for path in redirection.expansion.paths for p in _from_each(path, directories)]
                    globs += [(redirection.access, _glob_forms(g, workspace, starts))
                              for glob in redirection.expansion.globs for g in _from_each(glob, directories, True)]
            accesses += [(Access.READ, _path_forms(p, workspace))
                         for word in shell.mentioned_paths() for p in _from_each(word, directories)]
            globs += [(Access.READ, _glob_forms(g, workspace, starts))
                      for glob in shell.mentioned_globs() for g in _from_each(glob, directories, True)]
        elif argument.kind is SubjectKind.PATH:
            forms = _path_forms(str(value), workspace)
            kinds = _ACCESSES.get(tool, ((),))[position]
            subjects.append(_Subject(SubjectKind.PATH, forms, written=Access.WRITE in kinds))
            accesses += [(access, forms) for access in kinds]
        else:
            subjects.append(_Subject(SubjectKind.TEXT, (str(value),)))
    if tool in _DIRECTORY_READERS:
        directory = arguments.get("path") or "."
        accesses.append((Access.READ, _path_forms(str(directory), workspace)))
    return _Call(tool, tuple(subjects), tuple(accesses), tuple(globs))


def _from_each(path: str, directories: Sequence[str], glob: bool = False) -> list[str]:
    """`path` as named, and, when relative, from each of `directories` (a glob's directory
    escaped to stand for itself)."""
    if path.startswith("/"):
        return [path]
    return [path, *(posixpath.join(literal_glob(d) if glob else d, path) for d in directories)]


def _path_forms(path: str, workspace: str | None) -> tuple[str, ...]:
    """The path as named (normalised) and, when it differs, with its symlinks resolved the way the
    sandbox resolves them (relative to the real workspace root; absolute when outside it). Both as
    given and without surrounding blanks: the tools take the path as given, where " /../x" is
    the workspace's x, while stripped it named a path outside it that no rule matched."""
    forms: list[str] = []
    for variant in dict.fromkeys((path, path.strip())):
        forms.append(_normalise_path(variant, workspace))
        if not workspace or len(variant) > 4096 or "\0" in variant:
            continue
        try:
            resolved = str(resolve_in_workspace(Path(workspace), variant))
        except ToolFailure:
            continue
        relative = relative_to_root(os.path.realpath(workspace), resolved)
        forms.append(normalise_relative(relative) if relative is not None else resolved)
    return tuple(dict.fromkeys(forms))


def _glob_forms(glob: str, workspace: str | None, starts: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A shell glob word's glob (`session_server.shell.Expansion`), in the forms its paths would
    have (`_path_forms`): its fixed start normalised, and with its symlinks resolved; an absolute
    form (`/tmp/*/s*/key`, or `../*/secret/key` resolved) also as the workspace-relative globs it
    matches inside the workspace (`s*/key`), which the rules' relative globs are compared with. A
    `..` past a wildcard may lead anywhere: `**`; so may a component such as `.*` that matches
    `..` (bash before 5.2 expands `.*` to `.` and `..` as well)."""
    if len(glob) > 4096 or "\0" in glob:
        return ("**",)
    parts = glob.split("/")  # `/` is never escaped in these globs
    fixed = next((i for i, part in enumerate(parts) if _UNESCAPED_WILDCARD.search(part)), len(parts))
    rest = [part for part in parts[fixed:] if part not in ("", ".")]
    if any(part == ".." or (part.startswith(".") and fnmatchcase("..", part)) for part in rest):
        return ("**",)
    start = "/".join(_ESCAPED.sub(r"\1", part) for part in parts[:fixed]) or ("/" if glob.startswith("/") else ".")
    if start not in starts:
        starts[start] = _path_forms(start, workspace)
    forms = []
    for form in starts[start]:
        if form == ".":
            forms.append("/".join(rest) or ".")
        elif form == "/":
            forms.append("/" + "/".join(rest))
        else:
            forms.append("/".join([literal_glob(form), *rest]))
    if workspace is not None:
        roots = dict.fromkeys((posixpath.normpath(workspace), os.path.realpath(workspace)))
        for form in [form for form in forms if form.startswith("/")]:
            for root in roots:
                forms += globs_within(form, root, covering=False) or ()
    return tuple(dict.fromkeys(forms))


def _any_match(rules: Iterable[Rule], call: _Call, inside: _Inside) -> Rule | None:
    """The first rule matching the call at all: bare, or its glob on any subject, piece or path
    (on a path the call writes, also on what it holds)."""
    for rule in rules:
        if rule.glob is None:
            if rule.tool == call.tool:
                return rule
            continue
        access = ACCESS_RULES.get(rule.tool)
        if access is not None and any(
            kind is access and any(
                rule.denies_path(form) or (kind is Access.WRITE and rule.denies_inside(form, inside))
                for form in forms
            )
            for kind, forms in call.accesses
        ):
            return rule
        if access is not None and any(
            kind is access and any(rule.denies_glob(form, inside.budget) for form in forms)
            for kind, forms in call.globs
        ):
            return rule
        if rule.tool != call.tool:
            continue
        for subject in call.subjects:
            if subject.kind is SubjectKind.PATH:
                if any(rule.denies_path(form) or (subject.written and rule.denies_inside(form, inside))
                       for form in subject.forms):
                    return rule
            elif subject.kind is SubjectKind.TEXT:
                if rule.matches_text(subject.forms[0]):
                    return rule
            elif any(rule.matches_text(text) for text in _command_texts(subject)):
                return rule
    return None


# Programs that run the rest of their words as a command, with the options of their own that
# take a value: `time rm x`, `env rm x` or `nice -n 5 rm x` was no way around deny bash(rm *).
# (Any program may run another one; these are the ones written in front of a command as a matter
# of course. An allow list, not a deny list, is what bounds a shell: README.)
_WRAPPERS: dict[str, frozenset[str]] = {
    "builtin": frozenset(), "command": frozenset(), "exec": frozenset({"-a"}), "time": frozenset(),
    "nohup": frozenset(), "setsid": frozenset(), "env": frozenset({"-u", "--unset", "-C", "--chdir", "-S"}),
    "nice": frozenset({"-n", "--adjustment"}), "ionice": frozenset({"-c", "-n", "-p"}),
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
}


def _command_texts(subject: _Subject) -> Iterable[str]:
    """What deny and ask command globs are matched against: the whole line, and each command as
    written and with its program named without its directory (`/bin/rm` is `rm`), and what a
    wrapper in front of it runs (`time rm x` is also `rm x`)."""
    yield subject.forms[0]
    assert subject.shell is not None
    for command in subject.shell.commands:
        yield command.text
        words = _without_assignments(list(command.words))
        while words:
            program = posixpath.basename(words[0])
            yield " ".join([program, *words[1:]])
            if program not in _WRAPPERS:
                break
            words = _wrapped(program, words[1:])


def _without_assignments(words: list[str]) -> list[str]:
    while words and "=" in words[0] and words[0].partition("=")[0].isidentifier():
        words.pop(0)
    return words


def _wrapped(wrapper: str, words: list[str]) -> list[str]:
    """The command `wrapper` runs, from the words after it: its own options (and their values),
    env's assignments and timeout's duration skipped."""
    with_value = _WRAPPERS[wrapper]
    while words and words[0].startswith("-") and words[0] != "-":
        option = words.pop(0)
        if option == "--":
            break
        if option in with_value and words:
            words.pop(0)
    if wrapper == "env":
        words = _without_assignments(words)
    elif wrapper == "timeout" and words:
        words.pop(0)  # the duration
    return words


def _every_match(rules: Sequence[Rule], call: _Call, workspace: str | None) -> Rule | None:
    """A rule set vouching for the whole call: a bare rule, or globs matching every piece."""
    mine = [r for r in rules if r.tool == call.tool]
    bare = next((r for r in mine if r.glob is None), None)
    if bare is not None:
        return bare
    if not call.subjects:
        return None
    first: Rule | None = None
    for subject in call.subjects:
        if subject.kind is SubjectKind.COMMAND:
            vouching = _vouch_for_shell(mine, rules, subject.shell, workspace)
            if vouching is None:
                return None
            first = first or vouching
            continue
        for form in subject.forms:
            if subject.kind is SubjectKind.PATH:
                rule = next((r for r in mine if r.allows_path(form)), None)
            else:
                rule = next((r for r in mine if r.matches_text(form)), None)
            if rule is None:
                return None
            first = first or rule
    return first


def _vouch_for_shell(
    mine: Sequence[Rule], rules: Sequence[Rule], shell: ShellLine | None, workspace: str | None
) -> Rule | None:
    """The first allow rule of a shell line every part of which some allow rule covers."""
    if shell is None or shell.opaque is not None or not shell.commands:
        return None
    first: Rule | None = None
    for command in shell.commands:
        rule = next((r for r in mine if r.covers(command)), None)
        if rule is None:
            return None
        first = first or rule
    directories = shell.directories()
    if directories is None:
        return None
    for redirection in shell.redirections:
        if redirection.target is None:
            return None
        path_rules = [r for r in rules if r.glob is not None and ACCESS_RULES.get(r.tool) is redirection.access]
        for path in _from_each(redirection.target, directories):
            for form in _path_forms(path, workspace):
                if not any(r.allows_path(form) for r in path_rules):
                    return None
    return first


def _parse_rules(texts: Sequence[str], name: str, known_tools: Collection[str] | None) -> tuple[Rule, ...]:
    if isinstance(texts, str):
        raise PolicyError(name, "must be a list of rules, not one string")
    return tuple(Rule.parse(text, f"{name}[{i}]", known_tools) for i, text in enumerate(texts))


def _action(value: Action | str, name: str) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise PolicyError(name, f"{value!r} is not one of allow, deny, ask") from None


def _place_all(rules: tuple[Rule, ...], workspace: str | None, covering: bool) -> tuple[Rule, ...]:
    if not workspace or not any(r.glob is not None and r.glob.startswith("/") for r in rules):
        return rules
    real: dict[str, str] = {}  # the real paths of the rules' fixed starts, shared between them
    return tuple(placed for rule in rules for placed in _placed(rule, workspace, covering, real))


def _placed(rule: Rule, workspace: str | None, covering: bool, real: dict[str, str] | None = None) -> tuple[Rule, ...]:
    """A path rule whose glob is absolute, placed in the workspace: paths inside it are matched
    relative to it, so the glob also stands for what it matches there (`globs_within`, from the
    workspace as named and as its real path), and for what it matches with the symlinks of its
    fixed start resolved up to the workspace (`/home/me/link-to-ws/secret/**`). `covering`: the
    rule covers what lies below what it matches (deny and ask rules)."""
    glob = rule.glob
    if glob is None or not workspace or not glob.startswith("/") or SUBJECTS[rule.tool][0].kind is not SubjectKind.PATH:
        return (rule,)
    real_root = os.path.realpath(workspace)
    forms = [glob]
    resolved = _resolved_start(glob, real_root, {} if real is None else real)
    if resolved is not None:
        forms.append(resolved)
    roots = tuple(dict.fromkeys((posixpath.normpath(workspace), real_root)))
    globs: list[str] = []
    for form in dict.fromkeys(forms):
        # As written, for paths outside the workspace (which stay absolute): needless when its
        # fixed start is in the workspace, as every path it matches then is.
        start = form[: m.start()] if (m := _PATH_WILDCARD.search(form)) else form + "/"
        if not any(relative_to_root(root, posixpath.dirname(start)) is not None for root in roots):
            globs.append(form)
        for root in roots:
            inside = globs_within(form, root, covering)
            if inside is None:  # more alternatives than are worth listing (refused when parsed)
                inside = ("**",) if covering else ()
            globs += inside
    return tuple(Rule(rule.text, rule.tool, g, rule.source, rule) for g in dict.fromkeys(globs))


def _resolved_start(glob: str, real_root: str, real: dict[str, str]) -> str | None:
    """The absolute `glob` with the symlinks of its fixed start resolved, up to the first name
    inside the real workspace `real_root` (past it, as the workspace's own paths, symlinks are
    the paths' to resolve: a rule naming a link the model made does not follow it)."""
    if len(glob) > 4096 or "\0" in glob:
        return None
    parts = glob.split("/")[1:]
    current, index = "/", 0
    while index < len(parts):
        part = parts[index]
        if relative_to_root(real_root, current) is not None or _PATH_WILDCARD.search(part) or part in ("", ".", ".."):
            break
        named = os.path.join(current, part)
        if named not in real:
            try:
                real[named] = os.path.realpath(named)
            except (OSError, ValueError):
                return None
        current = real[named]
        index += 1
    return "/".join([literal_glob(current).rstrip("/"), *parts[index:]]) or "/"


def _normalise_path(path: str, workspace: str | None) -> str:
    if workspace and path.startswith("/"):
        inside = relative_to_root(posixpath.normpath(workspace), posixpath.normpath(path))
        if inside is not None:
            path = inside
    return normalise_relative(path)


def _check_path_glob(glob: str, text: str, source: str) -> None:
    """Refuses a path glob that would fail when matched: it is compiled on the first call it is
    checked on, and its error failed that turn, and every later one of the session."""
    # Its translation recurses once per level of braces, so deep braces raise RecursionError;
    # compiling it here would not tell: this stack may be shallower than the turn's.
    depth = deepest = 0
    for char in glob:
        depth += {"{": 1, "}": -1}.get(char, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_GLOB_BRACE_DEPTH:
        raise PolicyError(source, f"{text!r} nests braces {deepest} deep; at most {MAX_GLOB_BRACE_DEPTH}")
    try:
        compile_path_glob(glob)
    except re.error as exc:
        raise PolicyError(source, f"{text!r} is not a glob a path can match: {exc}") from None
    if glob.startswith("/") and expand_braces(glob, MAX_BRACE_ALTERNATIVES) is None:
        raise PolicyError(
            source, f"{text!r}: an absolute glob is placed in the workspace by its braces' alternatives, and "
            f"these stand for more than {MAX_BRACE_ALTERNATIVES:,} globs"
        )


def _normalise_rule_path(glob: str) -> str:
    """A path rule's glob in the form paths are matched in: no empty or `.` components, a `..`
    after a fixed name taken back (`a/../b` is `b`), and a trailing `/` meaning the directory and
    everything in it (`secret/` is `secret/**`, `./` the whole workspace)."""
    absolute = glob.startswith("/")
    directory = glob.endswith("/")
    parts: list[str] = []
    for part in glob.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != ".." and not _PATH_WILDCARD.search(parts[-1]):
            parts.pop()
            continue
        if part == ".." and absolute and not parts:
            continue  # `/..` is `/`
        parts.append(part)
    if directory and (not parts or parts[-1] != "**"):
        parts.append("**")
    body = "/".join(parts)
    return "/" + body if absolute else body or "."
