"""What the pool and its neighbours exchange: registrations, assignments, the link to a worker, and
the call as the pool sees it. Domain types only, no grpc."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tool_worker.merkle import Digest, Holding, SnapshotRef
from tool_worker.tools.base import ToolSpec

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_HEARTBEAT_INTERVAL = 2.0
# A worker silent for this long is lost (three missed heartbeats).
DEFAULT_HEARTBEAT_TIMEOUT = 6.0
# How long a call whose worker was lost waits for another capable worker before failing.
DEFAULT_NO_WORKER_WAIT = 5.0
# Tool names a server and its workers may offer together: OpenAI's models take at most 128 tools
# a request, and every session's model is offered every name (--max-tools).
DEFAULT_MAX_TOOLS = 128


class InvalidRegistration(ValueError):
    """A worker's Hello cannot be accepted; the message says why."""


class PoolClosed(Exception):
    """The server is stopping: the pool admits no worker."""

    def __init__(self) -> None:
        super().__init__("the session server is shutting down: connect to it again once it is back")


class WorkerIdTaken(Exception):
    """A live stream holds the worker id, and the Hello does not prove it is that worker."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(
            f"worker id {worker_id!r} is held by a connected worker: give this worker another --id, or stop the "
            "other one (a worker reconnecting after a broken connection takes its id back with its reconnect token)"
        )
        self.worker_id = worker_id


class ToolSpecConflict(Exception):
    """The Hello offers a tool that a connected worker offers under the same name with another spec:
    the model is given one spec per name, so both cannot be served."""

    def __init__(self, tool_name: str, holder_id: str) -> None:
        super().__init__(
            f"tool {tool_name!r} is offered by connected worker {holder_id!r} with a different spec (description, "
            "schema, lane, idempotent or required labels): workers offering one tool name must offer the same spec. "
            "Rename this worker's tool, or drain the workers with the old spec first"
        )
        self.tool_name = tool_name
        self.holder_id = holder_id


class TooManyTools(Exception):
    """The Hello would take the tool names the pool offers past the server's limit: every
    session's model is offered every one of them (OpenAI takes at most 128 tools a request, and
    each spec is sent with every request), so one worker offering too many would fail or slow every
    turn of every session."""

    def __init__(self, limit: int, offered: int, new_names: list[str]) -> None:
        shown = ", ".join(new_names[:5]) + (f" and {len(new_names) - 5} more" if len(new_names) > 5 else "")
        super().__init__(
            f"the server offers {offered} tool names (its own and its workers') and allows at most {limit} "
            f"(--max-tools); this worker would add {len(new_names)}: {shown}. Offer fewer tools from this worker, "
            "drain workers whose tools are no longer needed, or raise --max-tools (OpenAI's models take at most "
            "128 tools a request)"
        )
        self.limit = limit


@dataclass(frozen=True)
class WorkerRegistration:
    worker_id: str
    tools: Sequence[ToolSpec]
    slots: int
    labels: Mapping[str, str] = field(default_factory=dict)
    workspace_roots: Sequence[str] = ()
    version: str = ""
    hostname: str = ""
    peer: str = ""
    # The secret of this id's previous Welcome, when the worker reconnects; empty otherwise.
    reconnect_token: str = ""
    # What it already holds (a worker restarting with its cache).
    holdings: Sequence[Holding] = ()


@dataclass(slots=True)
class Assignment:
    """One attempt of one call, as sent to a worker."""

    # The pool's id of this attempt, unique for the pool's lifetime: Cancel and results use it.
    dispatch_id: str
    # The model's id of the call, for logs.
    call_id: str
    attempt: int
    tool_name: str
    arguments_json: str
    workspace: str
    session_id: str
    deadline: float  # wall-clock seconds since the epoch
    # Globs of the paths the session's policy denies reading (worker.proto, Assign.denied_paths).
    denied_paths: tuple[str, ...] = ()
    # W3C trace context of the call's span on the server ("" when it does not trace).
    traceparent: str = ""
    tracestate: str = ""
    # The snapshot the call must see (None: the server has none to name).
    snapshot: SnapshotRef | None = None


class LinkFault(enum.Enum):
    """Why the hub ends a worker's stream with an error status (the servicer maps it to one)."""

    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    REPLACED = "WORKER_REPLACED"
    SHUTTING_DOWN = "SHUTTING_DOWN"


class WorkerLink(Protocol):
    """How the pool talks to one worker. Every method queues and returns at once: the link
    writes what is queued on its own, in order, and never raises into the pool."""

    def assign(self, assignment: Assignment) -> None: ...

    def cancel(self, assignment: Assignment, reason: str) -> None: ...

    def drain(self, reason: str) -> None: ...

    def close(self, reason: str, fault: LinkFault | None = None) -> None: ...


class PlacementObserver(Protocol):
    """Who owns a call hears where the pool put it. Called synchronously; must not block."""

    def assigned(self, worker_id: str, attempt: int) -> None:
        """The call (attempt `attempt`) was handed to a worker."""

    def lost(self, worker_id: str, reason: str, next_attempt: int | None) -> None:
        """Its worker was lost; `next_attempt` is the retry's number, None when not retried."""


@dataclass
class QueryCall:
    """One Query-lane call to run on a worker."""

    session_id: str
    call_id: str
    tool_name: str
    arguments_json: str
    workspace: str
    idempotent: bool = True
    required_labels: Mapping[str, str] = field(default_factory=dict)
    # Seconds it may take from now, its queue wait included (Assign.deadline is what is left).
    timeout: float = 60.0
    # The call's whole time limit, which a TIMEOUT result names: its owner may dispatch it with
    # only what is left of that (`timeout`). None: `timeout` is the whole limit.
    limit: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    observer: PlacementObserver | None = None
    # Globs of the paths the session's policy denies reading (worker.proto, Assign.denied_paths).
    denied_paths: tuple[str, ...] = ()
    # W3C trace context the worker continues ("" when the server does not trace).
    traceparent: str = ""
    tracestate: str = ""
    # The snapshot of `workspace` the call must see.
    snapshot: SnapshotRef | None = None
    # The number of its first attempt here: above 1 when the caller dispatches the call again
    # (with a newer snapshot), so attempts keep counting up in the call's events.
    first_attempt: int = 1

    @property
    def whole_limit(self) -> float:
        """The call's whole time limit, as its TIMEOUT result names it."""
        return self.timeout if self.limit is None else self.limit


@dataclass(frozen=True)
class WorkspaceHeld:
    """A worker's holding of one workspace, as ListWorkers shows it."""

    mode: str
    digest: Digest | None
    reason: str = ""

    @property
    def visible(self) -> bool:
        return self.mode in ("shared", "synced")


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker as ListWorkers shows it."""

    worker_id: str
    version: str
    hostname: str
    peer: str
    labels: dict[str, str]
    tools: list[str]
    slots: int
    in_flight: int
    workspace_roots: list[str]
    draining: bool
    connected_at: float  # epoch seconds
    last_seen: float  # epoch seconds
    # workspace -> what the worker reported holding of it
    workspaces: dict[str, WorkspaceHeld]
    completed: int
    max_in_flight_seen: int
