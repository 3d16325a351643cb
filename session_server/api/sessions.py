"""SessionService: translates requests to SessionManager calls and domain errors to statuses."""

from __future__ import annotations

import contextlib

import grpc

from codelane.v1 import session_pb2, session_pb2_grpc
from session_server.admission import AtCapacity, ShuttingDown
from session_server.api import convert
from session_server.api.errors import abort
from session_server.bus import SessionClosed
from session_server.config import InvalidArgument
from session_server.confirmations import ConfirmationNotFound
from session_server.external import LeaseNotHeld, TaskNotFound
from session_server.paging import encode_page_token
from session_server.sessions import (
    CaughtUp,
    ModelUnavailable,
    SequenceOutOfRange,
    SessionManager,
    SessionNotFound,
    TurnInProgress,
)
from session_server.tool_listing import session_tools
from tool_worker import wire

# A GetMessages page token is the offset of the page's first message in decimal digits: past 18
# SQLite cannot take it.
MAX_OFFSET_DIGITS = 18


async def _session_not_found(context, exc: SessionNotFound):
    await abort(context, grpc.StatusCode.NOT_FOUND, str(exc), "SESSION_NOT_FOUND", session_id=exc.session_id)


async def _refused(context, exc: AtCapacity | ShuttingDown):
    """New work the server does not take now: over a limit, or while it stops (which also ends
    the event streams and claims still open)."""
    if isinstance(exc, ShuttingDown):
        await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc), "SHUTTING_DOWN", retry_after=exc.retry_after,
                    retry_after_seconds=f"{exc.retry_after:g}")
    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry after {exc.retry_after:g}s", "AT_CAPACITY",
                retry_after=exc.retry_after, limit=exc.limit, value=str(exc.value),
                retry_after_seconds=f"{exc.retry_after:g}")


@contextlib.asynccontextmanager
async def _held_task(context, request):
    """Around an RPC on a claimed external task (its session already checked): checks the task and
    client ids, and maps the errors to statuses."""
    for name in ("task_id", "client_id"):
        if not getattr(request, name):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{name} is empty", "INVALID_ARGUMENT", field=name)
    try:
        yield
    except SessionNotFound as exc:
        await _session_not_found(context, exc)
    except InvalidArgument as exc:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field=exc.field)
    except TaskNotFound as exc:
        await abort(context, grpc.StatusCode.NOT_FOUND, str(exc), "TASK_NOT_FOUND", task_id=exc.task_id)
    except LeaseNotHeld as exc:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "LEASE_NOT_HELD",
                    task_id=exc.task_id, client_id=exc.client_id)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    async def _session(self, context, session_id: str):
        if not session_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty", "INVALID_ARGUMENT",
                        field="session_id")
        try:
            return self._manager.get_session(session_id)
        except SessionNotFound as exc:
            await _session_not_found(context, exc)

    async def CreateSession(self, request, context):
        try:
            record = await self._manager.create_session(
                request.workspace, convert.settings_request(request.config), dict(request.labels)
            )
        except InvalidArgument as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field=exc.field)
        except (AtCapacity, ShuttingDown) as exc:
            await _refused(context, exc)
        return session_pb2.CreateSessionResponse(session=convert.session(record, self._manager.settings_of(record)))

    async def GetSession(self, request, context):
        record = await self._session(context, request.session_id)
        return session_pb2.GetSessionResponse(session=convert.session(record, self._manager.settings_of(record)))

    async def ListSessions(self, request, context):
        try:
            records, token = self._manager.list_sessions(request.page_size, request.page_token)
        except ValueError as exc:
            field = "page_token" if "token" in str(exc) else "page_size"
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field=field)
        # The store bounds a page by its sessions' configurations and labels; their workspace paths
        # (up to 4 KiB each, a thousand to a page) are bytes of the answer too: bounded here as
        # encoded, under what a client with gRPC's default limits reads.
        created = {record.session_id: record.created for record in records}
        sessions, cut = convert.page_within(
            (convert.session(record, self._manager.settings_of(record)) for record in records),
            lambda s: convert.field_bytes(len(encode_page_token(created[s.session_id], s.session_id))))
        if cut:
            token = encode_page_token(created[sessions[-1].session_id], sessions[-1].session_id)
        return session_pb2.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def DeleteSession(self, request, context):
        await self._session(context, request.session_id)
        await self._manager.delete_session(request.session_id)
        return session_pb2.DeleteSessionResponse()

    async def SendMessage(self, request, context):
        await self._session(context, request.session_id)
        try:
            _, events = await self._manager.start_turn(request.session_id, request.text)
        except TurnInProgress as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "TURN_IN_PROGRESS",
                        session_id=request.session_id)
        except ModelUnavailable as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "MODEL_UNAVAILABLE", model=exc.model)
        except InvalidArgument as exc:
            # The session's workspace is no longer one the server allows (--workspace-root, or
            # in the data directory).
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "WORKSPACE_NOT_ALLOWED",
                        field=exc.field)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="text")
        except (AtCapacity, ShuttingDown) as exc:
            await _refused(context, exc)
        try:
            async for batch in events:
                for message in convert.batched(batch, session_pb2.SendMessageResponse, lambda m: m.events):
                    yield message
        except SessionClosed:
            await abort(context, grpc.StatusCode.NOT_FOUND, "the session was deleted during the turn",
                        "SESSION_NOT_FOUND", session_id=request.session_id)
        except ShuttingDown as exc:
            await _refused(context, exc)

    async def WatchEvents(self, request, context):
        await self._session(context, request.session_id)
        try:
            async for item in self._manager.watch(request.session_id, request.after_sequence, request.follow):
                if isinstance(item, CaughtUp):
                    yield session_pb2.WatchEventsResponse(
                        caught_up=session_pb2.CaughtUp(last_sequence=item.last_sequence)
                    )
                else:
                    for message in convert.batched(item, session_pb2.WatchEventsResponse, lambda m: m.events.events):
                        yield message
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="after_sequence")
        except SequenceOutOfRange as exc:
            await abort(context, grpc.StatusCode.OUT_OF_RANGE, str(exc), "SEQUENCE_OUT_OF_RANGE",
                        last_sequence=str(exc.last))
        except SessionClosed:
            await abort(context, grpc.StatusCode.NOT_FOUND, "the session was deleted", "SESSION_NOT_FOUND",
                        session_id=request.session_id)
        except (AtCapacity, ShuttingDown) as exc:
            await _refused(context, exc)

    async def CancelTurn(self, request, context):
        await self._session(context, request.session_id)
        return session_pb2.CancelTurnResponse(cancelled=self._manager.cancel_turn(request.session_id, request.reason))

    async def GetMessages(self, request, context):
        await self._session(context, request.session_id)
        token = request.page_token
        if token and not (len(token) <= MAX_OFFSET_DIGITS and token.isascii() and token.isdigit()):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"page_token {request.page_token!r} is not one this server issued", "INVALID_ARGUMENT",
                        field="page_token")
        offset = int(token or 0)
        try:
            page, following = self._manager.messages(request.session_id, offset, request.page_size)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="page_size")
        # Within the byte bound whatever page_size asked, unless its first message alone passes
        # it: a page holds at least one message, or a history would stop there.
        messages, cut = convert.page_within((convert.message(stored) for stored in page),
                                            lambda _: convert.field_bytes(MAX_OFFSET_DIGITS))
        if cut:
            following = offset + len(messages)
        return session_pb2.GetMessagesResponse(messages=messages, next_page_token=str(following) if following else "")

    async def ConfirmToolCall(self, request, context):
        await self._session(context, request.session_id)
        if not request.call_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "call_id is empty", "INVALID_ARGUMENT",
                        field="call_id")
        try:
            self._manager.confirm(request.session_id, request.call_id, request.approve, request.reason)
        except InvalidArgument as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field=exc.field)
        except ConfirmationNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc), "CONFIRMATION_NOT_FOUND",
                        session_id=exc.session_id, call_id=exc.call_id)
        return session_pb2.ConfirmToolCallResponse()

    async def ClaimExternalTasks(self, request, context):
        await self._session(context, request.session_id)
        try:
            tasks = await self._manager.claim_external_tasks(
                request.session_id,
                request.client_id,
                request.max_tasks,
                wire.seconds(request.lease) if request.HasField("lease") else None,
                wire.seconds(request.wait) if request.HasField("wait") else None,
            )
        except InvalidArgument as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field=exc.field)
        except ShuttingDown as exc:
            await _refused(context, exc)
        return session_pb2.ClaimExternalTasksResponse(tasks=[convert.external_task(t) for t in tasks])

    async def CompleteExternalTask(self, request, context):
        await self._session(context, request.session_id)
        if len(request.result.metadata_json) > wire.MAX_METADATA_JSON_CHARS:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"result.metadata_json is {len(request.result.metadata_json):,} characters: at most "
                        f"{wire.MAX_METADATA_JSON_CHARS:,} are accepted; put bulky details in the output",
                        "INVALID_ARGUMENT", field="result.metadata_json")
        async with _held_task(context, request):
            self._manager.complete_external_task(
                request.session_id, request.task_id, request.client_id, wire.result_from_proto(request.result)
            )
        return session_pb2.CompleteExternalTaskResponse()

    async def RenewExternalTaskLease(self, request, context):
        await self._session(context, request.session_id)
        async with _held_task(context, request):
            task = self._manager.renew_external_task_lease(
                request.session_id,
                request.task_id,
                request.client_id,
                wire.seconds(request.lease) if request.HasField("lease") else None,
            )
        return session_pb2.RenewExternalTaskLeaseResponse(task=convert.external_task(task))

    async def ListTools(self, request, context):
        record = await self._session(context, request.session_id)
        manager = self._manager
        tools = session_tools(manager.settings_of(record), manager.registry, manager.pool,
                              manager.local_fallback, manager.local_query_tools)
        return session_pb2.ListToolsResponse(tools=[convert.available_tool(tool) for tool in tools])
