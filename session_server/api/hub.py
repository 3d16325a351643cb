"""WorkerHubService.Connect: one bidirectional stream per worker, translated to WorkerPool calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from codelane import __version__
from codelane.v1 import worker_pb2, worker_pb2_grpc
from session_server.pool import Assignment, InvalidRegistration, WorkerPool, WorkerRegistration
from tool_worker import wire

log = logging.getLogger(__name__)

# A worker must say Hello this soon after opening its stream.
HELLO_TIMEOUT = 10.0


class _StreamLink:
    """A WorkerLink over one Connect stream.

    grpc.aio allows one write at a time and each write costs a trip through gRPC's core, so
    messages are queued and written under a lock, every queued Assign coalesced into one
    Assignments message: under load, one write carries many calls. The pool flushes assignments
    from the task that made them; a writer task sends control messages (cancel, probe, drain).
    """

    def __init__(self) -> None:
        # Assigns are built in place in the next message to go out (no copy when it is sent).
        self._assignments: worker_pb2.ConnectResponse | None = None
        self._control: list[worker_pb2.ConnectResponse] = []
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._context: grpc.aio.ServicerContext | None = None
        self.closed_reason = ""
        self._closed = False

    def assign(self, assignment: Assignment) -> None:
        if self._assignments is None:
            self._assignments = worker_pb2.ConnectResponse()
        message = self._assignments.assignments.assigns.add(
            call_id=assignment.call_id,
            attempt=assignment.attempt,
            tool_name=assignment.tool_name,
            arguments_json=assignment.arguments_json,
            workspace=assignment.workspace,
            session_id=assignment.session_id,
            denied_paths=assignment.denied_paths,
        )
        wire.set_timestamp(message.deadline, assignment.deadline)
        # No wake-up for the writer task: the pool flushes assignments from the task that made
        # them, which keeps a loop iteration off every call's path.

    def _send(self, message: worker_pb2.ConnectResponse) -> None:
        self._control.append(message)
        self._wake.set()

    def cancel(self, call_id: str, attempt: int, reason: str) -> None:
        self._send(
            worker_pb2.ConnectResponse(cancel=worker_pb2.Cancel(call_id=call_id, attempt=attempt, reason=reason))
        )

    def probe(self, probe_id: str, workspace: str) -> None:
        self._send(worker_pb2.ConnectResponse(probe=worker_pb2.Probe(probe_id=probe_id, workspace=workspace)))

    def drain(self, reason: str) -> None:
        self._send(worker_pb2.ConnectResponse(drain=worker_pb2.Drain(reason=reason)))

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self._closed = True
        self._wake.set()

    def bind(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def flush(self) -> None:
        if self._context is None or self._write_lock.locked():
            # Not welcomed yet (the Welcome goes first), or the holder writes everything queued
            # before it lets go.
            return
        async with self._write_lock:
            while (self._assignments is not None or self._control) and not self._closed:
                # Assignments first, so a Cancel never overtakes the Assign it withdraws.
                if self._assignments is not None:
                    message, self._assignments = self._assignments, None
                    await self._context.write(message)
                while self._control:
                    await self._context.write(self._control.pop(0))

    async def write_until_closed(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            await self.flush()


def registration_from_hello(hello: worker_pb2.Hello, peer: str) -> WorkerRegistration:
    """Raises InvalidRegistration for a Hello the pool cannot accept."""
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
    )


class WorkerHubServicer(worker_pb2_grpc.WorkerHubServiceServicer):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of Connect must be a Hello")
        if first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of Connect must be a Hello")
        link = _StreamLink()
        try:
            reg = registration_from_hello(first.hello, context.peer())
            self._pool.register(reg, link)
        except InvalidRegistration as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        worker_id = reg.worker_id
        log.info(
            "worker %s connected from %s (%d slots, tools: %s)",
            worker_id,
            reg.peer,
            reg.slots,
            ", ".join(t.name for t in reg.tools),
        )
        welcome = worker_pb2.Welcome(
            worker_id=worker_id,
            heartbeat_interval=wire.duration(self._pool.heartbeat_interval),
            hub_version=__version__,
        )
        await context.write(worker_pb2.ConnectResponse(welcome=welcome))
        # Calls assigned since register() waited for the Welcome to go first.
        link.bind(context)
        await link.flush()
        reader = asyncio.create_task(self._read(worker_id, request_iterator))
        writer = asyncio.create_task(link.write_until_closed())
        reason = "the worker closed its stream"
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                reason = link.closed_reason or "stream write failed"
            elif reader.exception() is not None:
                reason = f"stream broken: {reader.exception()}"
        finally:
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._pool.unregister(worker_id, link, reason)
            await self._pool.flush()  # its calls, retried on other workers
            log.info("worker %s disconnected: %s", worker_id, reason)

    async def _read(self, worker_id: str, request_iterator) -> None:
        pool = self._pool
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "results":
                for msg in request.results.results:
                    pool.on_result(worker_id, msg.call_id, msg.attempt, wire.result_from_proto(msg.result))
            elif kind == "heartbeat":
                pool.heartbeat(worker_id)
            elif kind == "probe_result":
                msg = request.probe_result
                pool.on_probe_result(worker_id, msg.probe_id, msg.fingerprint, msg.error)
            elif kind == "draining":
                pool.worker_draining(worker_id)
            # A second Hello or an unknown message from a newer worker is ignored, not fatal.
            await pool.flush()
            if kind == "results" and not pool.in_flight(worker_id):
                # The worker is idle, so latency is what counts: the callers these results woke
                # run before this task sets up its next read. (Under load this would only cost
                # a loop turn per message.)
                await asyncio.sleep(0)
