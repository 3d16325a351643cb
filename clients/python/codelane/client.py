"""The async Python SDK: sessions, turns and event streams, without `_pb2` objects.

    async with Client("127.0.0.1:50051") as client:
        session = await client.create_session("/path/to/repo")
        async for event in session.send("Find the TODOs"):
            print(event.kind, event.sequence)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from codelane.events import (
    CaughtUp,
    Event,
    ExternalTask,
    ToolCall,
    ToolResult,
    TurnFinished,
    event_from_proto,
    session_state,
)
from codelane.transport import bearer_metadata, create_channel, parse_address
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, tools_pb2, workspace_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Extra deadline a long-polling claim gets beyond its wait, for the network and the server.
CLAIM_DEADLINE_MARGIN = 30.0
# A send or watch whose stream breaks resumes with WatchEvents after the last event it yielded.
# It gives up, raising the error, once this many seconds have passed since the break without any
# reply from a resumed stream (long enough for a server to restart). Counted from the break, not
# from the last event: a watch of an idle session, or a send waiting on a long tool call, may go
# quiet for much longer than this and must still be resumed when its connection then drops.
RESUME_WITHIN = 20.0
# Pause before a resume that follows another one without a new event in between, doubled each
# time; the first resume after some progress is immediate. (A resumed stream that only says it
# is caught up, then breaks again, keeps its pause: a server that accepts and cuts every stream
# is not hammered.)
RESUME_BACKOFF_INITIAL = 0.1
RESUME_BACKOFF_MAX = 2.0
# The clock RESUME_WITHIN is counted on; tests move a manual one on instead of waiting.
_clock = time.monotonic
# The ErrorInfo reason of the RESOURCE_EXHAUSTED that cuts a subscriber which fell behind.
SUBSCRIBER_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"

log = logging.getLogger("codelane.client")

_ACTIONS = {
    "allow": session_pb2.PERMISSION_ACTION_ALLOW,
    "deny": session_pb2.PERMISSION_ACTION_DENY,
    "ask": session_pb2.PERMISSION_ACTION_ASK,
}
_LANES = {"query": tools_pb2.LANE_QUERY, "execute": tools_pb2.LANE_EXECUTE}
_LANE_MODES = {
    "internal": tools_pb2.LANE_MODE_INTERNAL,
    "external": tools_pb2.LANE_MODE_EXTERNAL,
    "hybrid": tools_pb2.LANE_MODE_HYBRID,
}
_PERMISSION_KEYS = {"allow", "deny", "ask", "default", "confirmation_timeout", "timeout_action"}
_SANDBOX_MODES = {
    "workspace-write": session_pb2.SANDBOX_MODE_WORKSPACE_WRITE,
    "read-only": session_pb2.SANDBOX_MODE_READ_ONLY,
    "off": session_pb2.SANDBOX_MODE_OFF,
}
_SANDBOX_NETWORKS = {"off": session_pb2.SANDBOX_NETWORK_OFF, "on": session_pb2.SANDBOX_NETWORK_ON}
_SANDBOX_LIMITS = {"max_processes", "max_memory_bytes", "max_open_files"}
_SANDBOX_KEYS = {"mode", "network", "max_cpu_time", *_SANDBOX_LIMITS}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _choice(table: Mapping[str, int], value: str, what: str) -> int:
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(table)}") from None


def permission_policy(permissions: Mapping[str, Any]) -> session_pb2.PermissionPolicy:
    """The PermissionPolicy of `Client.create_session(permissions=...)`'s dict:

        {"allow": ["bash(git *)"], "deny": ["delete"], "ask": ["write(src/**)"],
         "default": "allow", "confirmation_timeout": 60, "timeout_action": "deny"}

    Every key is optional; rule syntax is checked by the server (INVALID_ARGUMENT naming the rule).
    """
    unknown = set(permissions) - _PERMISSION_KEYS
    if unknown:
        raise ValueError(f"unknown permissions keys {sorted(unknown)}; use {sorted(_PERMISSION_KEYS)}")
    for key in ("allow", "deny", "ask"):
        if isinstance(permissions.get(key), str):
            raise ValueError(f"permissions[{key!r}] must be a list of rules, not one string")
    policy = session_pb2.PermissionPolicy(
        allow=list(permissions.get("allow", ())), deny=list(permissions.get("deny", ())),
        ask=list(permissions.get("ask", ())),
    )
    if "default" in permissions:
        policy.default_action = _choice(_ACTIONS, permissions["default"], "permissions default")
    if "confirmation_timeout" in permissions:
        policy.confirmation_timeout.CopyFrom(_duration(permissions["confirmation_timeout"]))
    if "timeout_action" in permissions:
        policy.timeout_action = _choice(_ACTIONS, permissions["timeout_action"], "permissions timeout_action")
    return policy


def sandbox_policy(sandbox: Mapping[str, Any]) -> session_pb2.SandboxPolicy:
    """The SandboxPolicy of `Client.create_session(sandbox=...)`'s dict:

        {"mode": "read-only", "network": "on", "max_processes": 64, "max_memory_bytes": 1 << 30,
         "max_cpu_time": 60, "max_open_files": 256}

    mode: "workspace-write", "read-only" or "off"; network: "off" or "on"; max_cpu_time in seconds.
    Every key is optional (the server's defaults); the server refuses what its operator does not
    allow (INVALID_ARGUMENT naming the field).
    """
    unknown = set(sandbox) - _SANDBOX_KEYS
    if unknown:
        raise ValueError(f"unknown sandbox keys {sorted(unknown)}; use {sorted(_SANDBOX_KEYS)}")
    policy = session_pb2.SandboxPolicy()
    if "mode" in sandbox:
        policy.mode = _choice(_SANDBOX_MODES, sandbox["mode"], "sandbox mode")
    if "network" in sandbox:
        policy.network = _choice(_SANDBOX_NETWORKS, sandbox["network"], "sandbox network")
    for key in _SANDBOX_LIMITS & set(sandbox):
        setattr(policy.limits, key, sandbox[key])
    if "max_cpu_time" in sandbox:
        policy.limits.max_cpu_time.CopyFrom(_duration(sandbox["max_cpu_time"]))
    return policy


def lane_configs(lanes: Mapping[str, str]) -> list[session_pb2.LaneConfig]:
    """LaneConfigs of `Client.create_session(lanes=...)`'s dict, e.g. {"execute": "external"}."""
    return [
        session_pb2.LaneConfig(lane=_choice(_LANES, lane, "lane"), mode=_choice(_LANE_MODES, mode, f"{lane} lane mode"))
        for lane, mode in lanes.items()
    ]


class CodelaneError(Exception):
    """A call failed. `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `reason` and
    `metadata` come from the server's ErrorInfo (e.g. reason "INVALID_ARGUMENT", {"field": ...})."""

    def __init__(self, code: str, message: str, reason: str = "", metadata: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    @classmethod
    def from_rpc_error(cls, exc: grpc.aio.AioRpcError) -> CodelaneError:
        reason, metadata = "", {}
        status = rpc_status.from_call(exc)
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
        return cls(exc.code().name, exc.details() or "", reason, metadata)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    workspace: str
    model: str
    state: str
    last_sequence: int
    message_count: int
    created: float
    labels: dict[str, str]
    # The sandbox mode of its commands: "workspace-write", "read-only" or "off".
    sandbox: str = ""

    @classmethod
    def from_proto(cls, msg: session_pb2.Session) -> SessionInfo:
        sandbox = session_pb2.SandboxMode.Name(msg.config.sandbox.mode).removeprefix("SANDBOX_MODE_")
        return cls(msg.session_id, msg.workspace, msg.config.model, session_state(msg.state), msg.last_sequence,
                   msg.message_count, msg.create_time.ToNanoseconds() / 1e9, dict(msg.labels),
                   sandbox.lower().replace("_", "-"))


@dataclass(frozen=True)
class Message:
    index: int
    role: str
    text: str
    tool_calls: tuple[ToolCall, ...]
    tool_call_id: str
    tool_result: ToolResult | None
    turn_id: str

    @classmethod
    def from_proto(cls, msg: session_pb2.Message) -> Message:
        role = session_pb2.MessageRole.Name(msg.role).removeprefix("MESSAGE_ROLE_").lower()
        return cls(msg.index, role, msg.text, tuple(ToolCall.from_proto(c) for c in msg.tool_calls), msg.tool_call_id,
                   ToolResult.from_proto(msg.tool_result) if msg.HasField("tool_result") else None, msg.turn_id)


@dataclass(frozen=True)
class WorkspaceHeld:
    """What a worker holds of one workspace (AdminService.ListWorkers)."""

    # True when it holds a snapshot (shared or synced).
    visible: bool
    # Why not, when it cannot hold the workspace.
    reason: str
    # "shared" (it reads the server's own files), "synced" (a copy in its cache), "syncing" or
    # "unavailable"; "" from a server too old to say.
    mode: str = ""
    # The snapshot held ("hash/size"; syncing: the one being fetched), or "".
    snapshot: str = ""


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    hostname: str
    labels: dict[str, str]
    tools: tuple[str, ...]
    slots: int
    in_flight: int
    draining: bool
    completed_calls: int
    workspaces: dict[str, WorkspaceHeld]
    version: str = ""
    # Network address of its stream, as the server sees it.
    peer: str = ""
    # When it connected (epoch seconds).
    connected: float = 0.0
    # Workspaces the server left out of `workspaces` to keep its answer under 3 MiB (only a worker
    # holding hundreds of workspaces with very long paths comes near).
    omitted_workspaces: int = 0


@dataclass(frozen=True)
class ToolInfo:
    """A tool a session's model is offered (SessionService.ListTools)."""

    name: str
    description: str
    # JSON Schema of the arguments object.
    parameters: dict[str, Any]
    # "query" or "execute".
    lane: str
    idempotent: bool
    required_labels: dict[str, str]
    # Where its calls run: "server", "workers" or "external_client".
    runner: str
    # Ready workers offering it now.
    worker_ids: tuple[str, ...]
    # Whether the server runs a call itself when no worker can.
    server_fallback: bool
    # Its lane's mode for the session: "internal", "external" or "hybrid".
    lane_mode: str

    @classmethod
    def from_proto(cls, msg: session_pb2.AvailableTool) -> ToolInfo:
        spec = msg.spec
        return cls(
            spec.name, spec.description, json.loads(spec.parameters_json_schema or "{}"),
            _enum_name(tools_pb2.Lane, spec.lane), spec.idempotent, dict(spec.required_labels),
            _enum_name(session_pb2.ToolRunner, msg.runner), tuple(msg.worker_ids), msg.server_fallback,
            _enum_name(tools_pb2.LaneMode, msg.lane_mode),
        )


def _enum_name(enum: Any, number: int) -> str:
    """A proto enum value as the SDK spells it: its name without the enum's prefix, lower case."""
    if not number:
        return ""
    prefix = enum.DESCRIPTOR.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return enum.Name(number).removeprefix(prefix).lower()


@dataclass(frozen=True)
class ServerInfo:
    version: str
    # When the server started serving (epoch seconds).
    started: float


@dataclass(frozen=True)
class LaneStats:
    lane: str
    pending: int
    active: int
    completed: int
    failed: int
    p50: float
    p90: float
    p99: float


def _cancelled_by_close() -> None:
    """Raises CodelaneError CANCELLED for a gRPC call cancelled under a task that nobody cancelled:
    its channel was closed (`Client.close`) while it ran. gRPC raises asyncio.CancelledError then,
    which would end that task as if it had been cancelled (quietly, in a TaskGroup) instead of
    failing. A cancelled task's own CancelledError is left to propagate."""
    task = asyncio.current_task()
    if task is not None and not task.cancelling():
        raise CodelaneError("CANCELLED", "the client was closed while this call was running") from None


@contextlib.contextmanager
def _rpc_errors() -> Iterator[None]:
    """gRPC's errors of the calls made inside, as CodelaneError (a close of the client included)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise CodelaneError.from_rpc_error(exc) from None
    except asyncio.CancelledError:
        _cancelled_by_close()
        raise


def _rpc(fn):
    """Turns gRPC errors of an SDK coroutine into CodelaneError."""

    async def wrapper(*args: Any, **kwargs: Any):
        with _rpc_errors():
            return await fn(*args, **kwargs)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def _resumable(error: CodelaneError) -> bool:
    """Whether a broken event stream is mended by a new one: the server cut a reader that fell
    behind, the connection was lost, the stream was reset, or the server cancelled it. A stopping
    server cancels the calls it has not started (a resume made at once after its SHUTTING_DOWN
    reaches it then); a call this client cancels, or closes, raises asyncio.CancelledError instead
    (see `_resuming`), never this."""
    if error.code == "RESOURCE_EXHAUSTED":
        return error.reason == SUBSCRIBER_TOO_SLOW
    return error.code in ("UNAVAILABLE", "INTERNAL", "CANCELLED")


def _stream_items(
    reply: session_pb2.SendMessageResponse | session_pb2.WatchEventsResponse,
) -> list[Event | CaughtUp]:
    """What a SendMessage or WatchEvents reply carries: its batch of events, or the replay's end
    marker."""
    if isinstance(reply, session_pb2.SendMessageResponse):
        return [event_from_proto(event) for event in reply.events]
    if reply.WhichOneof("item") == "caught_up":
        return [CaughtUp(reply.caught_up.last_sequence)]
    return [event_from_proto(event) for event in reply.events.events]


class Client:
    """A connection to a codelane server. Reuse one per process; close it (or `async with`)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float | None = None,
    ) -> None:
        """`timeout`: seconds allowed to each unary call (None: no deadline); streams never time out.
        ValueError for an address that is not HOST:PORT, [IPV6]:PORT, unix:PATH or
        unix-abstract:NAME (gRPC would dial port 443 for a bare host), as the CLI says it."""
        self.address = parse_address(address)
        self._channel = create_channel(self.address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                       unary_timeout=timeout)
        self._metadata = bearer_metadata(token)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._unanswered: set[asyncio.Task[None]] = set()  # see _hold_until_answered

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        # The sends still waiting for the server's answer end with the channel: nothing is left
        # pending on a loop that may be closed next (the sync client closes its own).
        for task in list(self._unanswered):
            task.cancel()
        await self._channel.close()
        await asyncio.gather(*self._unanswered, return_exceptions=True)

    def _hold_until_answered(self, call: Any) -> None:
        """Keeps a started SendMessage call alive until the server answers it (its first event, or
        its refusal), even when the caller drops the stream unread: gRPC cancels a call it
        garbage-collects, and one cancelled before the server took it would start no turn. Once
        answered, the turn runs on whatever becomes of the stream."""

        async def answered() -> None:
            with contextlib.suppress(Exception):  # an error is for whoever reads the stream
                await call.initial_metadata()

        task = asyncio.get_running_loop().create_task(answered())
        self._unanswered.add(task)
        task.add_done_callback(self._unanswered.discard)

    @_rpc
    async def create_session(
        self,
        workspace: str | Path,
        *,
        model: str = "",
        system_prompt: str = "",
        max_turns: int = 0,
        max_output_tokens: int = 0,
        query_concurrency: int = 0,
        labels: dict[str, str] | None = None,
        permissions: Mapping[str, Any] | None = None,
        lanes: Mapping[str, str] | None = None,
        external_task_timeout: float | None = None,
        sandbox: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Session:
        """Creates a session on a workspace directory of the server's machine (0 / "" = defaults).

        `permissions`: a policy as a dict (see `permission_policy`), e.g.
        `{"deny": ["bash(rm *)"], "ask": ["write"], "confirmation_timeout": 30}`; None allows every call.
        `lanes`: lane name ("query", "execute") to mode ("internal", "external", "hybrid"), e.g.
        `{"execute": "external"}` to run side-effecting calls yourself (`Session.run_external_tasks`).
        `external_task_timeout`: seconds an external task may take overall (None: the server's 10 min).
        `sandbox`: how bash and execute are confined, as a dict (see `sandbox_policy`), e.g.
        `{"mode": "read-only"}`; None takes the server's defaults.
        `env`: the session's own environment variables for its commands (a confined command gets
        only PATH, HOME, LANG, TERM, TMPDIR and these).
        `max_output_tokens`: most tokens per model response (0: 8192); lower it for a model whose
        output limit is smaller.
        """
        config = session_pb2.SessionConfig(
            model=model, system_prompt=system_prompt, max_turns=max_turns, max_output_tokens=max_output_tokens,
            queue=session_pb2.QueueConfig(query_concurrency=query_concurrency, lanes=lane_configs(lanes or {})),
        )
        if external_task_timeout is not None:
            config.queue.external_task_timeout.CopyFrom(_duration(external_task_timeout))
        if permissions is not None:
            config.permissions.CopyFrom(permission_policy(permissions))
        if sandbox is not None:
            config.sandbox.CopyFrom(sandbox_policy(sandbox))
        config.env.update(env or {})
        reply = await self._sessions.CreateSession(
            session_pb2.CreateSessionRequest(workspace=str(workspace), config=config, labels=labels or {}),
            metadata=self._metadata,
        )
        return Session(self, SessionInfo.from_proto(reply.session))

    @_rpc
    async def get_session(self, session_id: str) -> Session:
        reply = await self._sessions.GetSession(session_pb2.GetSessionRequest(session_id=session_id),
                                                metadata=self._metadata)
        return Session(self, SessionInfo.from_proto(reply.session))

    async def list_sessions(self, page_size: int = 50) -> AsyncIterator[SessionInfo]:
        """Every session, newest first, fetched a page at a time."""
        token = ""
        while True:
            with _rpc_errors():
                reply = await self._sessions.ListSessions(
                    session_pb2.ListSessionsRequest(page_size=page_size, page_token=token), metadata=self._metadata
                )
            for msg in reply.sessions:
                yield SessionInfo.from_proto(msg)
            token = reply.next_page_token
            if not token:
                return

    @_rpc
    async def delete_session(self, session_id: str) -> None:
        await self._sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session_id),
                                           metadata=self._metadata)

    @_rpc
    async def list_workers(self) -> list[WorkerInfo]:
        """Every connected worker, by id (every page is fetched)."""
        workers: list[WorkerInfo] = []
        token = ""
        while True:
            reply = await self._admin.ListWorkers(admin_pb2.ListWorkersRequest(page_token=token),
                                                  metadata=self._metadata)
            workers += [
                WorkerInfo(w.worker_id, w.hostname, dict(w.labels), tuple(w.tools), w.slots, w.in_flight,
                           w.state == admin_pb2.WORKER_STATE_DRAINING, w.completed_calls,
                           {v.workspace: _workspace_held(v) for v in w.workspaces}, w.version, w.peer,
                           w.connect_time.ToNanoseconds() / 1e9, w.omitted_workspaces)
                for w in reply.workers
            ]
            token = reply.next_page_token
            if not token:
                return workers

    @_rpc
    async def list_tools(self, session_id: str) -> list[ToolInfo]:
        """The tools a session's model is offered now, sorted by name, with where each runs."""
        reply = await self._sessions.ListTools(session_pb2.ListToolsRequest(session_id=session_id),
                                               metadata=self._metadata)
        return [ToolInfo.from_proto(tool) for tool in reply.tools]

    @_rpc
    async def server_info(self) -> ServerInfo:
        """The server's version and start time."""
        reply = await self._admin.GetServerInfo(admin_pb2.GetServerInfoRequest(), metadata=self._metadata)
        return ServerInfo(reply.version, reply.start_time.ToNanoseconds() / 1e9)

    @_rpc
    async def health(self, service: str = "") -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", ...) of the server (service
        "") or of one of its services, e.g. "codelane.v1.SessionService"; CodelaneError NOT_FOUND
        for a service it does not serve. Needs no token."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = await health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), metadata=self._metadata
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    @_rpc
    async def drain_worker(self, worker_id: str, reason: str = "") -> None:
        await self._admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id=worker_id, reason=reason),
                                      metadata=self._metadata)

    @_rpc
    async def queue_stats(self) -> list[LaneStats]:
        reply = await self._admin.GetQueueStats(admin_pb2.GetQueueStatsRequest(), metadata=self._metadata)
        return [
            LaneStats(tools_pb2.Lane.Name(s.lane).removeprefix("LANE_").lower(), s.pending, s.active, s.completed,
                      s.failed, s.latency_p50.ToNanoseconds() / 1e9, s.latency_p90.ToNanoseconds() / 1e9,
                      s.latency_p99.ToNanoseconds() / 1e9)
            for s in reply.lanes
        ]


class Session:
    """One session. `send()` runs a turn; `watch()` replays and follows its events."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.session_id

    def send(self, text: str) -> AsyncIterator[Event]:
        """Sends a user message now, and returns an async iterator of the turn's events, ending
        with TurnFinished: `async for event in session.send(text)`.

        The message is sent when `send` is called, not when the iteration begins (as the Node
        client's `sendMessage`): the turn starts even if its events are read later, or never.
        Errors of the call itself (a turn already running, an unknown session) are raised by the
        iteration. If the stream breaks once the turn has started (the server cut it because
        this reader fell behind, the connection dropped or was reset), the events go on from a
        WatchEvents resumed after the last one yielded: none is missed or repeated. Leaving the
        loop stops listening, not the turn: resume with `watch(after=last_sequence_seen)`."""
        call = self._client._sessions.SendMessage(
            session_pb2.SendMessageRequest(session_id=self.id, text=text), metadata=self._client._metadata
        )
        self._client._hold_until_answered(call)
        return self._turn_events(call)

    async def _turn_events(self, call: Any) -> AsyncIterator[Event]:
        """The events of the turn `call` (a started SendMessage) runs, as `send` describes."""
        turn_id = ""
        # Before the first event the turn is unknown (it may not have started): nothing to resume.
        async for event in self._resuming(call, after=0, follow=True, resume_at_once=False):
            if isinstance(event, CaughtUp):
                continue  # a resumed watch's marker: not an event of the turn
            turn_id = turn_id or event.turn_id
            if event.turn_id == turn_id:
                yield event
                if isinstance(event, TurnFinished):
                    return

    async def watch(self, after: int = 0, *, follow: bool = True) -> AsyncIterator[Event | CaughtUp]:
        """Stored events with sequence > after, a CaughtUp marker, then live ones (if follow).
        A stream that breaks is resumed after the last event yielded, as in `send`; the CaughtUp
        marker comes once."""
        call = self._client._sessions.WatchEvents(
            session_pb2.WatchEventsRequest(session_id=self.id, after_sequence=after, follow=follow),
            metadata=self._client._metadata,
        )
        async for item in self._resuming(call, after=after, follow=follow, resume_at_once=True):
            yield item

    async def _resuming(
        self, call: Any, *, after: int, follow: bool, resume_at_once: bool
    ) -> AsyncIterator[Event | CaughtUp]:
        """Yields the items of the stream `call`; each time it breaks in a way a new stream
        mends (`_resumable`), goes on with a WatchEvents after the last event yielded. The first
        CaughtUp marker is yielded, later ones (of resumed watches) are not. Ends when a watch
        that does not follow has sent its marker and ended; a send's caller stops at its
        TurnFinished. `resume_at_once`: whether a stream that breaks before its first event is
        resumed too (else its error is raised). The error is raised too once RESUME_WITHIN has
        passed since the break with no reply from any resumed stream."""
        last = after
        caught_up = False
        broken_at: float | None = None  # when the stream broke, since when no stream has answered
        broke: CodelaneError | None = None  # why it broke then (a server shutting down, say), for the give-up
        delay = 0.0  # no pause before the first resume after progress
        # When a resumed stream that has not answered yet is given up (event loop time): one that
        # neither answers nor fails (a server that takes the connection and says nothing) would
        # otherwise be waited on for ever, past the budget.
        give_up_at: float | None = None
        try:
            while True:
                try:
                    replies = aiter(call)
                    while True:
                        try:
                            async with asyncio.timeout_at(give_up_at):
                                reply = await anext(replies)
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            why = f" ({broke.code}: {broke.message})" if broke is not None else ""
                            raise CodelaneError("UNAVAILABLE", f"no reply from the server in the {RESUME_WITHIN:g} s "
                                                f"since the event stream broke{why}") from None
                        broken_at = give_up_at = broke = None  # it answers (a marker counts): a later break is new
                        for item in _stream_items(reply):
                            if isinstance(item, CaughtUp):
                                if caught_up:
                                    continue
                                caught_up = True
                            elif item.sequence <= last:
                                continue  # yielded before the resume
                            else:
                                last, delay = item.sequence, 0.0
                            yield item
                    if caught_up and not follow:
                        return
                    error = CodelaneError("UNAVAILABLE", "the event stream ended early")
                except grpc.aio.AioRpcError as exc:
                    error = CodelaneError.from_rpc_error(exc)
                except asyncio.CancelledError:
                    _cancelled_by_close()
                    raise
                now = _clock()
                if broken_at is None:
                    broken_at = now  # the budget starts now, however long the stream had been quiet
                    broke = error
                if (not _resumable(error) or (last == after and not resume_at_once)
                        or now - broken_at > RESUME_WITHIN):
                    raise error
                log.info("session %s: event stream broke (%s: %s); resuming after sequence %d", self.id, error.code,
                         error.message, last)
                give_up_at = asyncio.get_running_loop().time() + RESUME_WITHIN - (now - broken_at)
                call.cancel()
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, RESUME_BACKOFF_INITIAL), RESUME_BACKOFF_MAX)
                try:
                    call = self._client._sessions.WatchEvents(
                        session_pb2.WatchEventsRequest(session_id=self.id, after_sequence=last, follow=follow),
                        metadata=self._client._metadata,
                    )
                except grpc.aio.UsageError:  # the client was closed while this stream waited to resume
                    raise CodelaneError("CANCELLED", "the client was closed while this call was running") from None
        finally:
            call.cancel()

    @_rpc
    async def cancel(self, reason: str = "") -> bool:
        """Cancels the running turn; False when none was running."""
        reply = await self._client._sessions.CancelTurn(
            session_pb2.CancelTurnRequest(session_id=self.id, reason=reason), metadata=self._client._metadata
        )
        return reply.cancelled

    async def tools(self) -> list[ToolInfo]:
        """The tools this session's model is offered now, sorted by name, with where each runs."""
        return await self._client.list_tools(self.id)

    @_rpc
    async def refresh(self) -> SessionInfo:
        reply = await self._client._sessions.GetSession(session_pb2.GetSessionRequest(session_id=self.id),
                                                        metadata=self._client._metadata)
        self.info = SessionInfo.from_proto(reply.session)
        return self.info

    @_rpc
    async def messages(self) -> list[Message]:
        """The whole history, in order."""
        out: list[Message] = []
        token = ""
        while True:
            reply = await self._client._sessions.GetMessages(
                session_pb2.GetMessagesRequest(session_id=self.id, page_token=token), metadata=self._client._metadata
            )
            out.extend(Message.from_proto(m) for m in reply.messages)
            token = reply.next_page_token
            if not token:
                return out

    @_rpc
    async def confirm(self, call_id: str, approve: bool, reason: str = "") -> None:
        """Answers a ConfirmationRequired event: run the call (approve) or refuse it; a refused
        call's `reason` is shown to the model. CodelaneError NOT_FOUND when no such call waits."""
        await self._client._sessions.ConfirmToolCall(
            session_pb2.ConfirmToolCallRequest(session_id=self.id, call_id=call_id, approve=approve, reason=reason),
            metadata=self._client._metadata,
        )

    @_rpc
    async def claim_external_tasks(
        self, client_id: str, max_tasks: int = 1, lease: float = 30.0, wait: float = 0.0
    ) -> list[ExternalTask]:
        """Claims up to `max_tasks` pending external tasks, each leased to `client_id` for `lease`
        seconds. With `wait` (at most 60 s), waits that long for a task when none is pending."""
        request = session_pb2.ClaimExternalTasksRequest(
            session_id=self.id, client_id=client_id, max_tasks=max_tasks, lease=_duration(lease)
        )
        if wait > 0:
            request.wait.CopyFrom(_duration(wait))
        reply = await self._client._sessions.ClaimExternalTasks(
            request, metadata=self._client._metadata, timeout=wait + CLAIM_DEADLINE_MARGIN
        )
        return [ExternalTask.from_proto(t) for t in reply.tasks]

    @_rpc
    async def complete_external_task(self, task_id: str, client_id: str, result: ToolResult) -> None:
        """Completes a claimed task with its result. CodelaneError FAILED_PRECONDITION when the
        lease is no longer this client's (it expired: the task was offered again), NOT_FOUND when
        the task is gone (completed, timed out, or its turn was cancelled)."""
        await self._client._sessions.CompleteExternalTask(
            session_pb2.CompleteExternalTaskRequest(
                session_id=self.id, task_id=task_id, client_id=client_id, result=result.to_proto()
            ),
            metadata=self._client._metadata,
        )

    @_rpc
    async def renew_external_task_lease(self, task_id: str, client_id: str, lease: float = 30.0) -> ExternalTask:
        """Extends this client's lease of a claimed task: it now ends `lease` seconds from now.
        Same errors as complete_external_task. `run_external_tasks` does this for you."""
        reply = await self._client._sessions.RenewExternalTaskLease(
            session_pb2.RenewExternalTaskLeaseRequest(
                session_id=self.id, task_id=task_id, client_id=client_id, lease=_duration(lease)
            ),
            metadata=self._client._metadata,
        )
        return ExternalTask.from_proto(reply.task)

    async def run_external_tasks(
        self,
        client_id: str,
        handler: Callable[[ExternalTask], Awaitable[ToolResult]],
        *,
        stop: asyncio.Event | None = None,
        max_tasks: int = 1,
        lease: float = 30.0,
        wait: float = 20.0,
    ) -> int:
        """Serves this session's external tasks until `stop` is set (or forever): claims with a
        long-poll of `wait` seconds, runs `await handler(task)` for each claimed task (up to
        `max_tasks` at once) and completes the task with the ToolResult it returns. An exception
        from the handler, or a return that is not a ToolResult, completes the task with an error
        result saying what was raised or returned.

        While a handler runs, its task's lease is renewed every `lease / 2` seconds, so a handler
        may run for as long as the task's deadline allows; `lease` is how soon another client gets
        the task if this one dies. When a renewal finds the task gone (it timed out, its turn was
        cancelled, or its lease was lost while the server was unreachable for a whole lease), the
        handler is cancelled: its result would be refused, and the loop goes on claiming (a plain
        function run by the sync client's thread cannot be stopped; its result is dropped). Setting
        `stop` lets running handlers finish. Returns how many tasks this loop completed. Errors of
        the claim itself (server gone, session deleted) raise.
        """
        completed = 0
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while stopper is None or not stopper.done():
                claim = asyncio.ensure_future(self.claim_external_tasks(client_id, max_tasks, lease, wait))
                try:
                    await asyncio.wait({claim} if stopper is None else {claim, stopper},
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not claim.done():  # stopped (or cancelled) while waiting for a task
                        claim.cancel()
                        await asyncio.gather(claim, return_exceptions=True)
                if claim.cancelled():
                    break
                tasks = claim.result()
                try:
                    async with asyncio.TaskGroup() as group:
                        runs = [
                            group.create_task(self._serve_external_task(client_id, handler, t, lease)) for t in tasks
                        ]
                except* CodelaneError as failed:
                    raise failed.exceptions[0] from None
                completed += sum(run.result() for run in runs)
        finally:
            if stopper is not None:
                stopper.cancel()
                await asyncio.gather(stopper, return_exceptions=True)
        return completed

    async def _keep_lease(self, task: ExternalTask, client_id: str, lease: float) -> None:
        """Renews a task's lease every `lease / 2` seconds until cancelled (its handler is done);
        returns when the task is gone (its result would be refused)."""
        while True:
            await asyncio.sleep(lease / 2)
            try:
                await self.renew_external_task_lease(task.task_id, client_id, lease)
            except CodelaneError as exc:
                if exc.code in ("FAILED_PRECONDITION", "NOT_FOUND"):
                    log.warning("external task %s: gone, its handler is cancelled: %s", task.task_id, exc.message)
                    return
                # The server may be back before the lease runs out: keep trying.
                log.warning("external task %s: could not renew the lease: %s", task.task_id, exc.message)

    async def _serve_external_task(
        self,
        client_id: str,
        handler: Callable[[ExternalTask], Awaitable[ToolResult]],
        task: ExternalTask,
        lease: float,
    ) -> bool:
        handling = asyncio.ensure_future(self._handle_external_task(client_id, handler, task))
        renewing = asyncio.create_task(self._keep_lease(task, client_id, lease))
        try:
            # A handler whose task is gone ran on to its end, holding one of max_tasks (with the
            # default of 1, every task after it timed out unclaimed).
            await asyncio.wait({handling, renewing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handling.cancel()
            renewing.cancel()
            await asyncio.gather(handling, renewing, return_exceptions=True)
        if handling.cancelled():
            return False
        result = handling.result()
        try:
            await self.complete_external_task(task.task_id, client_id, result)
        except CodelaneError as exc:
            if exc.code not in ("FAILED_PRECONDITION", "NOT_FOUND"):
                raise
            log.warning("external task %s: result not taken: %s", task.task_id, exc.message)
            return False
        return True

    @staticmethod
    async def _handle_external_task(
        client_id: str, handler: Callable[[ExternalTask], Awaitable[ToolResult]], task: ExternalTask
    ) -> ToolResult:
        """The handler's result, or an error result saying what it raised or wrongly returned."""
        try:
            result = await handler(task)
            if not isinstance(result, ToolResult):
                # The handler's mistake (a forgotten return, the output alone), reported as its
                # error: completing with it would fail, ending the loop and leaving the task held.
                raise TypeError(f"the handler returned {result!r:.200}, not a ToolResult")
        except Exception as exc:
            log.exception("external task %s (%s): the handler raised", task.task_id, task.call.tool_name)
            return ToolResult(
                output=f"{task.call.tool_name} failed in client {client_id}: {type(exc).__name__}: {exc}",
                is_error=True, error_kind="tool_error",
            )
        return result


def _workspace_held(msg: admin_pb2.WorkspaceVisibility) -> WorkspaceHeld:
    mode = workspace_pb2.WorkspaceMode.Name(msg.mode).removeprefix("WORKSPACE_MODE_").lower() if msg.mode else ""
    snapshot = f"{msg.root_digest.hash}/{msg.root_digest.size_bytes}" if msg.root_digest.hash else ""
    return WorkspaceHeld(msg.visible, msg.reason, mode, snapshot)
