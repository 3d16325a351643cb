"""The shape of a tool: a spec, an async implementation, and the result it returns.

Plain dataclasses, no grpc and no protobuf: the worker and the session server convert them to
and from the wire in `tool_worker.wire`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import functools
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tool_worker.confinement.policy import SandboxPolicy
from tool_worker.denied import DeniedPaths, normalise_relative, relative_to_root

if TYPE_CHECKING:
    from tool_worker.confinement.launcher import Sandbox
    from tool_worker.effects import EffectsFunction


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def well_formed(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, the replacement character.

    A Python string may hold surrogates that UTF-8, and so protobuf and SQLite, cannot encode: a
    model's JSON may say "\\ud800", and file names are read with surrogateescape. Whatever such a
    string reaches (an event, a result, the history) must still be sent and stored."""
    return text if text.isascii() else _LONE_SURROGATES.sub("\ufffd", text)


# One tool result's output (a plugin's, a worker's or an external client's, which codelane does
# not bound itself): the server keeps this much, and a worker sends no more.
MAX_RESULT_OUTPUT_CHARS = 1024 * 1024


def cut(text: str, limit: int, what: str) -> str:
    """`text`, or its first `limit` characters and a notice saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... {what} cut by codelane: {len(text) - limit:,} of {len(text):,} characters left out]"


def bound_result(result: ToolResult) -> ToolResult:
    """The result with its output cut to MAX_RESULT_OUTPUT_CHARS and `well_formed` (a copy when
    that changes it: results are values). The output goes into history, events and the next
    model request, all UTF-8; a worker sends no more than this, which the server keeps."""
    output = well_formed(result.output)
    if len(output) <= MAX_RESULT_OUTPUT_CHARS:
        return result if output is result.output else dataclasses.replace(result, output=output)
    return dataclasses.replace(result, output=cut(output, MAX_RESULT_OUTPUT_CHARS, "tool output"), truncated=True)


class Lane(enum.StrEnum):
    """Scheduling lane of a tool. Mirrors codelane.v1.Lane."""

    QUERY = "query"
    EXECUTE = "execute"


class ErrorKind(enum.StrEnum):
    """Why a result is an error. Mirrors codelane.v1.ErrorKind."""

    INVALID_ARGUMENTS = "invalid_arguments"
    UNKNOWN_TOOL = "unknown_tool"
    TOOL_ERROR = "tool_error"
    PATH_ESCAPE = "path_escape"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    WORKER_LOST = "worker_lost"
    NO_WORKER = "no_worker"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"
    # Never executed: the server was at an operator's limit (session_server.admission), or a
    # worker was sent a call beyond its slots.
    AT_CAPACITY = "at_capacity"
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    RESOURCE_LIMIT = "resource_limit"
    # A worker could not fetch the snapshot a call named: the workspace changed since it was taken.
    SNAPSHOT_CHANGED = "snapshot_changed"


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about a tool, and how calls of it are scheduled and routed."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    lane: Lane
    idempotent: bool
    required_labels: Mapping[str, str] = field(default_factory=dict)

    def parameters_json(self) -> str:
        return json.dumps(self.parameters, sort_keys=True)


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call. Errors are results too: the model reads `output` either way.

    A value: frozen, so a tool may return a shared constant and nobody downstream can change it
    for the next caller. Whoever adds to a result (timings, worker id) makes a copy with
    `dataclasses.replace`.
    """

    output: str
    is_error: bool = False
    error_kind: ErrorKind | None = None
    exit_code: int | None = None
    truncated: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    # Filled in by whoever ran or scheduled the call, not by the tool itself.
    worker_id: str = ""
    attempt: int = 1
    queue_wait: float = 0.0
    run_time: float = 0.0

    @classmethod
    def error(cls, kind: ErrorKind, message: str, **extra: Any) -> ToolResult:
        return cls(output=message, is_error=True, error_kind=kind, **extra)


class ToolFailure(Exception):
    """Raised inside a tool to end the call with an error result of the given kind."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.TOOL_ERROR) -> None:
        super().__init__(message)
        self.kind = kind


def _default_sandbox() -> Sandbox:
    from tool_worker.confinement.launcher import default_sandbox

    return default_sandbox()


# When the running call must have ended, on the event loop's clock (None: no limit beyond the
# tool's own), set by whoever runs it under a time limit of its own. A tool that winds down with
# what it has (a command killed, its output so far returned) aims to be done by then: cut off
# from outside instead, it returned nothing of it.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


@dataclass(frozen=True)
class ToolContext:
    """What a running call may know: the workspace it is confined to, the paths in it that the
    session's policy denies reading (globs, see `tool_worker.denied`), how this process confines
    the processes tools start, and the session's sandbox policy."""

    workspace: Path
    denied_paths: tuple[str, ...] = ()
    sandbox: Sandbox = field(default_factory=_default_sandbox)
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)

    @functools.cached_property
    def denied(self) -> DeniedPaths:
        return DeniedPaths(self.denied_paths)

    @functools.cached_property
    def root(self) -> str:
        """The workspace with every symlink resolved."""
        return os.path.realpath(self.workspace)

    def hides(self, relative: str) -> bool:
        """Whether a path (relative to the workspace root) must be left out of a listing."""
        return bool(self.denied) and self.denied.denies(self.root, relative) is not None

    def check_readable(self, resolved: Path, shown: str) -> None:
        """Raises PERMISSION_DENIED when the policy denies reading `resolved` (a path that
        `resolve_in_workspace` returned for the argument `shown`)."""
        if not self.denied:
            return
        relative = relative_to_root(self.root, str(resolved))
        named = shown if not os.path.isabs(shown) else relative_to_root(self.root, os.path.normpath(shown))
        for candidate in (named, relative):
            glob = None if candidate is None else self.denied.matching(normalise_relative(candidate))
            if glob is not None:
                raise ToolFailure(
                    f"{shown} is not readable: reading it is denied (deny read({glob}), by this session's "
                    "permission policy or the server's deny list)",
                    ErrorKind.PERMISSION_DENIED,
                )


ToolFunction = Callable[[ToolContext, dict[str, Any]], Awaitable[ToolResult]]
# Whether a call (workspace, validated arguments) costs less to run in the session server than to
# send to a worker: the server's default placement rule runs such calls itself.
CheaperHere = Callable[[Path, dict[str, Any]], bool]


@dataclass(frozen=True)
class Tool:
    """A spec plus its async implementation, and what a call of it may read and write in its
    workspace (`tool_worker.effects`): with it, a call waits only for the earlier calls it could
    observe or disturb. None: everything, so the call is ordered against every other one."""

    spec: ToolSpec
    run: ToolFunction
    effects: EffectsFunction | None = None
    cheaper_here: CheaperHere | None = None

    @property
    def name(self) -> str:
        return self.spec.name
