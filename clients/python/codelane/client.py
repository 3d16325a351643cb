"""The async Python SDK: sessions, turns and event streams, without `_pb2` objects.

    async with Client("127.0.0.1:50051") as client:
        session = await client.create_session("/path/to/repo")
        async for event in session.send("Find the TODOs"):
            print(event.kind, event.sequence)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from codelane.events import CaughtUp, Event, ToolCall, ToolResult, event_from_proto, session_state
from codelane.transport import bearer_metadata, create_channel
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, tools_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"


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

    @classmethod
    def from_proto(cls, msg: session_pb2.Session) -> SessionInfo:
        return cls(msg.session_id, msg.workspace, msg.config.model, session_state(msg.state), msg.last_sequence,
                   msg.message_count, msg.create_time.ToNanoseconds() / 1e9, dict(msg.labels))


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
class WorkerInfo:
    worker_id: str
    hostname: str
    labels: dict[str, str]
    tools: tuple[str, ...]
    slots: int
    in_flight: int
    draining: bool
    completed_calls: int
    workspaces: dict[str, tuple[bool, str]]


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


def _rpc(fn):
    """Turns gRPC errors of an SDK coroutine into CodelaneError."""

    async def wrapper(*args: Any, **kwargs: Any):
        try:
            return await fn(*args, **kwargs)
        except grpc.aio.AioRpcError as exc:
            raise CodelaneError.from_rpc_error(exc) from None

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


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
    ) -> None:
        self.address = address
        self._channel = create_channel(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self._metadata = bearer_metadata(token)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @_rpc
    async def create_session(
        self,
        workspace: str | Path,
        *,
        model: str = "",
        system_prompt: str = "",
        max_turns: int = 0,
        query_concurrency: int = 0,
        labels: dict[str, str] | None = None,
    ) -> Session:
        """Creates a session on a workspace directory of the server's machine (0 / "" = defaults)."""
        config = session_pb2.SessionConfig(
            model=model, system_prompt=system_prompt, max_turns=max_turns,
            queue=session_pb2.QueueConfig(query_concurrency=query_concurrency),
        )
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
            try:
                reply = await self._sessions.ListSessions(
                    session_pb2.ListSessionsRequest(page_size=page_size, page_token=token), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                raise CodelaneError.from_rpc_error(exc) from None
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
        reply = await self._admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=self._metadata)
        return [
            WorkerInfo(w.worker_id, w.hostname, dict(w.labels), tuple(w.tools), w.slots, w.in_flight,
                       w.state == admin_pb2.WORKER_STATE_DRAINING, w.completed_calls,
                       {v.workspace: (v.visible, v.reason) for v in w.workspaces})
            for w in reply.workers
        ]

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

    async def send(self, text: str) -> AsyncIterator[Event]:
        """Sends a user message; yields the turn's events, ending with TurnFinished. If this
        stream breaks, the turn goes on: resume with `watch(after=last_sequence_seen)`."""
        call = self._client._sessions.SendMessage(
            session_pb2.SendMessageRequest(session_id=self.id, text=text), metadata=self._client._metadata
        )
        try:
            async for reply in call:
                yield event_from_proto(reply.event)
        except grpc.aio.AioRpcError as exc:
            raise CodelaneError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def watch(self, after: int = 0, *, follow: bool = True) -> AsyncIterator[Event | CaughtUp]:
        """Stored events with sequence > after, a CaughtUp marker, then live ones (if follow)."""
        call = self._client._sessions.WatchEvents(
            session_pb2.WatchEventsRequest(session_id=self.id, after_sequence=after, follow=follow),
            metadata=self._client._metadata,
        )
        try:
            async for reply in call:
                if reply.WhichOneof("item") == "caught_up":
                    yield CaughtUp(reply.caught_up.last_sequence)
                else:
                    yield event_from_proto(reply.event)
        except grpc.aio.AioRpcError as exc:
            raise CodelaneError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    @_rpc
    async def cancel(self, reason: str = "") -> bool:
        """Cancels the running turn; False when none was running."""
        reply = await self._client._sessions.CancelTurn(
            session_pb2.CancelTurnRequest(session_id=self.id, reason=reason), metadata=self._client._metadata
        )
        return reply.cancelled

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
