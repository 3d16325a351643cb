"""WorkerHubService.Connect: one bidirectional stream per worker, translated to WorkerPool calls.

This is the pool's transport: it turns the pool's requests into stream messages and decides when
to write them. grpc.aio allows one write at a time and each write is a trip through gRPC's core,
so what is queued while a write is in flight goes out together in the next message: under load
one write carries many calls, and an idle worker is written to at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from codelane import __version__
from codelane.v1 import worker_pb2, worker_pb2_grpc
from session_server.api.decoding import UndecodableMessage
from session_server.api.errors import MAX_MESSAGE_BYTES, MAX_METADATA_VALUE_BYTES, abort, bounded
from session_server.pool import (
    Assignment,
    InvalidRegistration,
    LinkFault,
    PoolClosed,
    ToolSpecConflict,
    TooManyTools,
    WorkerIdTaken,
    WorkerPool,
    WorkerRegistration,
)
from tool_worker import snapshot_wire, wire
from tool_worker.telemetry import logs as log_context

log = logging.getLogger(__name__)

# A worker must say Hello this soon after opening its stream.
HELLO_TIMEOUT = 10.0
_DRAINED = "the worker drained and closed its stream"
# How long a write may take on a stream whose requests ended without Draining, to tell a dead
# connection from a half-close (only on that path: a drain never waits).
CONNECTION_CLOSE_GRACE = 1.0
# Written to tell a half-closed stream from a dead connection: a Cancel no worker can match.
_NO_CALL_CANCEL = worker_pb2.ConnectResponse(cancel=worker_pb2.Cancel(reason="the hub checks the connection"))

_FAULT_STATUS = {
    LinkFault.HEARTBEAT_TIMEOUT: grpc.StatusCode.UNAVAILABLE,
    LinkFault.REPLACED: grpc.StatusCode.ABORTED,
    LinkFault.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
}


MAX_HELLO_TOOLS = 256
MAX_HELLO_BYTES = 1024 * 1024
# One tool's spec, encoded: every session's model is sent every spec with each request, and
# ListTools answers them all, which must stay under the 4 MiB a gRPC client takes by default
# (with --max-tools 128: 2 MiB of specs at most).
MAX_TOOL_SPEC_BYTES = 16 * 1024


class _StreamLink:
    """A WorkerLink over one Connect stream: the pool queues, one writer task writes.

    Every method queues and returns at once; `write_until_closed`, the stream's one writer, sends
    what is queued, Assigns first so that a Cancel never overtakes the Assign it withdraws, and
    the Assigns queued during a write share the next Assignments message. Only that task writes:
    grpc takes one write at a time and still sends a write whose caller was cancelled, so a write
    from the dispatching task (a call may be cancelled at any time) needed a task and a shield of
    its own for the next write to wait on: 6 of each call's 12 loop callbacks on the hub. The
    writer costs one wake-up, and a cancelled call can never leave a write half-owned.
    A failed write closes the link; it never raises into the pool.
    """

    def __init__(self, write_timeout: float) -> None:
        # A worker that stops reading its stream fills the transport's window, and a write then
        # waits for ever: one that waits this long (the heartbeat timeout) loses the worker, as
        # silence does. Unbounded, it held the worker's calls past every deadline.
        self._write_timeout = write_timeout
        # Assigns are built in place in the next message to go out (no copy when it is sent).
        self._assignments: worker_pb2.ConnectResponse | None = None
        # Control messages, each with the future of whoever waits to hear whether it was written.
        self._control: list[tuple[worker_pb2.ConnectResponse, asyncio.Future[bool] | None]] = []
        self._wake = asyncio.Event()
        self._context: grpc.aio.ServicerContext | None = None
        self.closed_reason = ""
        self.fault: LinkFault | None = None
        self._closed = False

    def assign(self, assignment: Assignment) -> None:
        if self._assignments is None:
            self._assignments = worker_pb2.ConnectResponse()
        message = self._assignments.assignments.assigns.add(
            dispatch_id=assignment.dispatch_id,
            call_id=assignment.call_id,
            attempt=assignment.attempt,
            tool_name=assignment.tool_name,
            arguments_json=assignment.arguments_json,
            workspace=assignment.workspace,
            session_id=assignment.session_id,
            denied_paths=assignment.denied_paths,
        )
        wire.set_timestamp(message.deadline, assignment.deadline)
        if assignment.traceparent:
            message.trace_context.traceparent = assignment.traceparent
            message.trace_context.tracestate = assignment.tracestate
        if assignment.snapshot is not None:
            snapshot_wire.set_snapshot(message.snapshot, assignment.snapshot)
        self._wake.set()

    def _send(self, message: worker_pb2.ConnectResponse, written: asyncio.Future[bool] | None = None) -> None:
        self._control.append((message, written))
        self._wake.set()

    def cancel(self, assignment: Assignment, reason: str) -> None:
        self._send(worker_pb2.ConnectResponse(cancel=worker_pb2.Cancel(
            dispatch_id=assignment.dispatch_id, call_id=assignment.call_id, attempt=assignment.attempt, reason=reason,
        )))

    def drain(self, reason: str) -> None:
        self._send(worker_pb2.ConnectResponse(drain=worker_pb2.Drain(reason=reason)))

    def close(self, reason: str, fault: LinkFault | None = None) -> None:
        if self._closed:
            return
        self.closed_reason, self.fault = reason, fault
        self._closed = True
        self._wake.set()

    def bind(self, context: grpc.aio.ServicerContext) -> None:
        """The stream to write to, once the Welcome went out: what was queued before goes next."""
        self._context = context

    async def carries_writes(self, within: float) -> bool:
        """Whether a message still reaches the worker's end of the stream within `within` s."""
        if self._context is None or self._closed:
            return False
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._send(_NO_CALL_CANCEL, written)
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(written)  # the writer still settles it after a timeout
        except TimeoutError:
            return False

    async def write_until_closed(self) -> None:
        """The stream's writer: sends what is queued until the link closes or a write fails."""
        assert self._context is not None, "bind() the stream first"
        written: asyncio.Future[bool] | None = None
        try:
            while not self._closed:
                if self._assignments is None and not self._control:
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                # Assignments first, so a Cancel never overtakes the Assign it withdraws.
                if self._assignments is not None:
                    message, self._assignments = self._assignments, None
                else:
                    message, written = self._control.pop(0)
                async with asyncio.timeout(self._write_timeout):
                    await self._context.write(message)
                if written is not None:
                    _settle(written, True)
                    written = None
        except TimeoutError:
            self.close(f"a write to the worker did not complete in {self._write_timeout:g}s (it reads "
                       "nothing of its stream, or far too slowly)", LinkFault.HEARTBEAT_TIMEOUT)
        except Exception as exc:  # the stream is broken: the Connect handler ends it
            self.close(f"writing to the worker failed: {exc}")
        finally:
            # Whoever waits to hear of a message this writer will not send hears it now.
            for _, waiting in [(None, written), *self._control]:
                if waiting is not None:
                    _settle(waiting, False)


def _settle(written: asyncio.Future[bool], outcome: bool) -> None:
    if not written.done():  # its waiter may have been cancelled
        written.set_result(outcome)


def registration_from_hello(hello: worker_pb2.Hello, peer: str) -> WorkerRegistration:
    """Raises InvalidRegistration for a Hello the pool cannot accept."""
    # Checked on the event loop (each schema costs about a millisecond), kept for the worker's
    # life and shown by ListWorkers: a Hello of 20,000 tools stood the server still for 14 s.
    if len(hello.tools) > MAX_HELLO_TOOLS:
        raise InvalidRegistration(f"hello.tools offers {len(hello.tools):,} tools; at most {MAX_HELLO_TOOLS}")
    if hello.ByteSize() > MAX_HELLO_BYTES:
        raise InvalidRegistration(f"the Hello is {hello.ByteSize():,} bytes; at most {MAX_HELLO_BYTES:,}")
    for spec in hello.tools:
        if spec.ByteSize() > MAX_TOOL_SPEC_BYTES:
            raise InvalidRegistration(
                f"hello.tools: {spec.name[:80]!r} is {spec.ByteSize():,} bytes encoded; a tool's spec takes at most "
                f"{MAX_TOOL_SPEC_BYTES:,} (every model request carries it): shorten its description or schema"
            )
    try:
        tools = [wire.spec_from_proto(spec) for spec in hello.tools]
    except ValueError as exc:
        raise InvalidRegistration(f"hello.tools: {exc}") from None
    return WorkerRegistration(
        worker_id=hello.worker_id,
        tools=tools,
        slots=hello.slots,
        labels=dict(hello.labels),
        workspace_roots=list(hello.workspace_roots),
        version=hello.version,
        hostname=hello.hostname,
        peer=peer,
        reconnect_token=hello.reconnect_token,
        holdings=[h for h in map(snapshot_wire.holding_from_proto, hello.holdings) if h is not None],
    )


# A refusal that stands (the same worker, for the same reason) is logged as a WARNING once in
# this many seconds, at DEBUG in between: a refused worker retries every few seconds for ever.
REFUSAL_LOG_INTERVAL = 60.0
# Refusals remembered for that at most; past it, the oldest are forgotten (and told again).
_REFUSALS_REMEMBERED = 1024


def _log_refusal(refusals: log_context.Repeats, hello: worker_pb2.Hello, context: grpc.aio.ServicerContext,
                 reason: str, exc: Exception) -> None:
    """Says in the server's log which worker was refused and why: a worker of an older release
    logs only the status code, and retries for ever, so this is where an operator upgrading one
    side first learns what stands in the way. Once a minute for the same worker and reason."""
    worker_id = bounded(hello.worker_id, MAX_METADATA_VALUE_BYTES)
    log.log(logging.DEBUG if refusals.lately((worker_id, reason)) else logging.WARNING,
            "worker %s from %s refused (%s): %s", worker_id or "(no id)", context.peer(), reason,
            bounded(str(exc), MAX_MESSAGE_BYTES), extra=log_context.ids(worker_id=worker_id))


async def _connection_closed(context: grpc.aio.ServicerContext, link: _StreamLink) -> bool:
    """Whether requests that ended without Draining ended with the connection (a killed process)
    rather than by the worker's half-close: gRPC reports both as the end of the requests. A
    half-closed stream still carries the hub's messages, a dead connection does not: the hub
    writes a Cancel of no call (which workers ignore, worker.proto) and sees whether it goes."""
    return context.cancelled() or not await link.carries_writes(CONNECTION_CLOSE_GRACE)


class WorkerHubServicer(worker_pb2_grpc.WorkerHubServiceServicer):
    """`content` is sent in every Welcome: where workers fetch snapshots, and the digest's
    exclusions."""

    def __init__(self, pool: WorkerPool, content: worker_pb2.ContentSource | None = None) -> None:
        self._pool = pool
        self._content = content or worker_pb2.ContentSource()
        self._refusals = log_context.Repeats(REFUSAL_LOG_INTERVAL, _REFUSALS_REMEMBERED)

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        # Each way of sending no Hello is told apart: "must be a Hello" sent a worker that sent
        # nothing in time (a slow start, a proxy holding the stream) after a message it never sent.
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT)
        except TimeoutError:
            # Not INVALID_ARGUMENT, which a worker takes for a refusal that stands and exits: a
            # Hello still on its way (a slow or lossy link, or one that went down just after the
            # stream opened) is no fault of the worker's, and the next attempt may get through.
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                        f"no Hello within {HELLO_TIMEOUT:g}s of opening the stream: a worker sends its Hello first, "
                        "at once (reconnect: a slow link may have held it)", "HELLO_TIMEOUT")
        except StopAsyncIteration:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        "the stream ended before its Hello: a worker sends its Hello first", "INVALID_HELLO")
        except UndecodableMessage as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"the first message of Connect must be a Hello: {exc}", "INVALID_HELLO")
        if first.WhichOneof("message") != "hello":
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message of Connect must be a Hello",
                        "INVALID_HELLO")
        link = _StreamLink(write_timeout=self._pool.heartbeat_timeout)
        try:
            reg = registration_from_hello(first.hello, context.peer())
            reconnect_token = self._pool.register(reg, link)
        except InvalidRegistration as exc:
            _log_refusal(self._refusals, first.hello, context, "INVALID_HELLO", exc)
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_HELLO")
        except WorkerIdTaken as exc:
            _log_refusal(self._refusals, first.hello, context, "WORKER_ID_TAKEN", exc)
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc), "WORKER_ID_TAKEN", worker_id=exc.worker_id)
        except ToolSpecConflict as exc:
            _log_refusal(self._refusals, first.hello, context, "TOOL_SPEC_CONFLICT", exc)
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "TOOL_SPEC_CONFLICT",
                        tool_name=exc.tool_name, worker_id=exc.holder_id)
        except TooManyTools as exc:
            _log_refusal(self._refusals, first.hello, context, "AT_CAPACITY", exc)
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "AT_CAPACITY", limit="max_tools",
                        value=str(exc.limit))
        except PoolClosed as exc:
            await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc), "SHUTTING_DOWN")
        worker_id = reg.worker_id
        log_context.worker_id.set(worker_id)
        log.info("worker %s connected from %s (%d slots, tools: %s)", worker_id, reg.peer, reg.slots,
                 ", ".join(t.name for t in reg.tools))
        welcome = worker_pb2.Welcome(
            worker_id=worker_id,
            heartbeat_interval=wire.duration(self._pool.heartbeat_interval),
            heartbeat_timeout=wire.duration(self._pool.heartbeat_timeout),
            hub_version=__version__,
            reconnect_token=reconnect_token,
            content=self._content,
        )
        reason = broken = "the connection to the worker broke (its process died or the network failed)"
        cause = "stream_broken"
        reader = writer = None
        undecodable: UndecodableMessage | None = None
        try:
            await context.write(worker_pb2.ConnectResponse(welcome=welcome))
            # Calls assigned since register() waited for the Welcome to go first.
            link.bind(context)
            reader = asyncio.create_task(self._read(worker_id, link, request_iterator))
            writer = asyncio.create_task(link.write_until_closed())
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                reason = link.closed_reason or "writing to the worker failed"
            elif isinstance(reader.exception(), UndecodableMessage):
                # A worker that sends what does not parse is broken, and a result it meant to send
                # may be lost: its stream ends, and its calls go elsewhere or end now, not at their
                # deadlines.
                undecodable = reader.exception()
                reason, cause = f"the hub cannot read the worker's stream: {undecodable}", "invalid_message"
            elif reader.exception() is not None:
                reason = f"the worker's stream broke: {reader.exception()}"
            else:
                reason = reader.result()
                cause = "drained" if reason == _DRAINED else "closed"
                if cause == "closed" and await _connection_closed(context, link):
                    reason, cause = broken, "stream_broken"
        finally:
            for task in (reader, writer):
                if task is not None:
                    task.cancel()
            for task in (reader, writer):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self._pool.unregister(worker_id, link, reason, cause)
            log.info("worker %s disconnected: %s", worker_id, reason)
        if undecodable is not None or link.fault is not None:
            try:
                if undecodable is not None:
                    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, reason, "INVALID_ARGUMENT")
                else:
                    await abort(context, _FAULT_STATUS[link.fault], link.closed_reason, link.fault.value,
                                worker_id=worker_id)
            except grpc.aio.AbortError:
                raise
            except Exception:
                if not context.done():
                    raise
                # The status waited behind messages the worker never read (gRPC sends them in
                # order), and the stream ended first (its connection closed, or the server stops):
                # nobody is left to tell. Ended as the cancelled call it is, rather than as an
                # error of gRPC's with a traceback.
                log.info("worker %s: its stream ended before its status could pass the messages it did not read",
                         worker_id)
                raise asyncio.CancelledError from None

    async def _read(self, worker_id: str, link: _StreamLink, request_iterator) -> str:
        """Feeds the worker's messages to the pool until the worker half-closes; returns why it
        ended. A message the pool chokes on is logged and skipped: one bad message never costs
        the worker its stream. One that does not parse raises UndecodableMessage: a stream of
        bytes the hub cannot read is a broken worker."""
        pool = self._pool
        drained = False
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "results" and not all(msg.dispatch_id for msg in request.results.results):
                # A worker from before dispatch ids (releases before 2026-12-03) answers by call_id
                # only: each of its results would be dropped, and each call it took would wait for
                # its deadline while the worker stayed ready for more. Its stream ends instead, as
                # one the hub cannot read: its calls go elsewhere or end now.
                raise UndecodableMessage(
                    "a CallResult without a dispatch_id: the worker speaks the protocol of codelane before "
                    "2026-12-03, which this server does not; upgrade the worker"
                )
            try:
                if kind == "results":
                    for msg in request.results.results:
                        pool.on_result(worker_id, link, msg.dispatch_id, wire.result_from_proto(msg.result))
                elif kind == "heartbeat":
                    pool.heartbeat(worker_id, link)
                elif kind == "holdings":
                    holdings = map(snapshot_wire.holding_from_proto, request.holdings.workspaces)
                    pool.on_holdings(worker_id, link, [h for h in holdings if h is not None])
                elif kind == "draining":
                    drained = True
                    pool.worker_draining(worker_id, link)
                # A second Hello or an unknown message from a newer worker is ignored, not fatal.
            except Exception:
                log.exception("worker %s: handling its %s message failed; the stream goes on", worker_id, kind)
            if kind == "results" and not pool.in_flight(worker_id):
                # The worker is idle, so latency is what counts: the callers these results woke
                # run before this task sets up its next read. (Under load this would only cost
                # a loop turn per message.)
                await asyncio.sleep(0)
        return _DRAINED if drained else (
            "the worker's stream ended without Draining (the worker closed it, or its connection dropped)"
        )
