"""The shape of a tool: a spec, an async implementation, and the result it returns.

Plain dataclasses, no grpc and no protobuf: the worker and the session server convert them to
and from the wire in `tool_worker.wire`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tool_worker.confinement.policy import SandboxPolicy

if TYPE_CHECKING:
    from tool_worker.confinement.launcher import Sandbox


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
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    RESOURCE_LIMIT = "resource_limit"


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


@dataclass
class ToolResult:
    """The outcome of one call. Errors are results too: the model reads `output` either way."""

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


@dataclass(frozen=True)
class ToolContext:
    """What a running call may know: the workspace it is confined to, how this process confines
    the processes tools start, and the session's sandbox policy."""

    workspace: Path
    sandbox: Sandbox = field(default_factory=_default_sandbox)
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)


ToolFunction = Callable[[ToolContext, dict[str, Any]], Awaitable[ToolResult]]


@dataclass(frozen=True)
class Tool:
    """A spec plus its async implementation."""

    spec: ToolSpec
    run: ToolFunction

    @property
    def name(self) -> str:
        return self.spec.name
