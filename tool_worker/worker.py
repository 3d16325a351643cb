"""The tool-worker process: dials a hub, offers its Query tools, runs what it is assigned.

    codelane worker --connect HOST:PORT [--token T] [--slots N] [--labels k=v,...]
                    [--root DIR ...] [--tools python.module] [--id ID]
                    [--metrics-listen HOST:PORT] [--health-listen HOST:PORT] [--otlp-endpoint URL]
                    [--cache-dir DIR] [--cache-size 10GiB] [--require TOOL:k=v,...]

One bidirectional stream carries everything. The worker reconnects with exponential backoff and
jitter when the hub goes away, and drains on SIGTERM: it says Draining, finishes its calls, and
exits 0 (a second signal stops it at once). A hub that refuses its token or its Hello ends it
with a non-zero exit and one clear line.

Each call runs on the snapshot its Assign names (tool_worker.workspaces): on the server's own
path when this host sees the same files there, else on a copy synced into --cache-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from codelane import __version__
from codelane.commands import args as types
from codelane.commands.common import unreachable
from codelane.transport import bearer_metadata, check_tls_files, create_channel
from codelane.v1 import worker_pb2, worker_pb2_grpc
from tool_worker import snapshot_wire, wire
from tool_worker.cas import CasClient
from tool_worker.child_watcher import pidfd_child_watcher
from tool_worker.confinement.launcher import Sandbox
from tool_worker.confinement.policy import SandboxSettings
from tool_worker.heap import freeze_startup_heap
from tool_worker.merkle import Holding
from tool_worker.observe import WorkerMetrics, WorkerTelemetry
from tool_worker.plugins import ToolHost
from tool_worker.registry import ToolRegistry
from tool_worker.telemetry import logs as log_context
from tool_worker.telemetry.config import split_address, start_tracing
from tool_worker.telemetry.endpoints import MetricsEndpoint, serve_health
from tool_worker.telemetry.logs import LOG_FORMATS, configure_logging, say
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, bound_result
from tool_worker.workspaces import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CACHE_SIZE,
    SnapshotChanged,
    WorkspaceManager,
    WorkspaceUnavailable,
)

log = logging.getLogger("codelane.worker")
PROG = "codelane worker"

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
PARENT_CHECK_INTERVAL = 1.0
EXIT_UNAUTHENTICATED = 3
EXIT_REJECTED = 2
# What the worker does with the Welcome's heartbeat_interval: 2 s when unset, and kept within
# these bounds. A negative or nanosecond interval made it send heartbeats in a loop, as fast as
# it could, its CPU taken from the calls it runs.
DEFAULT_HEARTBEAT_INTERVAL = 2.0
MIN_HEARTBEAT_INTERVAL = 0.01
MAX_HEARTBEAT_INTERVAL = 3600.0


class WorkerRejected(Exception):
    """The hub refused this worker for good (token or Hello): reconnecting will not help."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class HelloRaced(Exception):
    """The Hello's write failed in gRPC's core because the hub had ended the stream meanwhile.
    grpc.aio then reports INTERNAL ("Internal error from Core") in place of the hub's status (a
    refused token, say), which only the next attempt can learn."""


class UnusableWelcome(Exception):
    """The hub's Welcome asks what this worker cannot do (exclusions it cannot apply): the same
    hub will say the same again, so reconnecting will not help."""


@dataclass
class WorkerConfig:
    address: str
    worker_id: str
    slots: int = 4
    token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    parent_pid: int | None = None
    metrics_listen: str | None = None
    health_listen: str | None = None
    otlp_endpoint: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_size: int = DEFAULT_CACHE_SIZE


# Characters of results (outputs and metadata) one CallResults message carries at most: at 4
# bytes a character in UTF-8, with one result's worth over it, well under gRPC's 64 MiB.
MAX_RESULTS_CHARS_PER_MESSAGE = 4 * 1024 * 1024


class _Outbox:
    """What the worker sends on one stream.

    grpc.aio allows one write at a time. Whoever holds the lock writes everything queued before
    letting go, so a message queued meanwhile is never stranded; results that pile up during a
    write go out together in one CallResults, built in place in the message to be sent, up to
    MAX_RESULTS_CHARS_PER_MESSAGE.

    A result is sent as the hub keeps it: its output cut to MAX_RESULT_OUTPUT_CHARS and its
    metadata over MAX_METADATA_JSON_CHARS replaced by a note. A plugin's bigger result would
    otherwise pass gRPC's 64 MiB message limit alone or with its neighbours: the write fails, the
    stream breaks, and the calls on it are lost.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self.lock = asyncio.Lock()
        self._messages: list[worker_pb2.ConnectRequest] = []
        self._results: worker_pb2.ConnectRequest | None = None
        self._results_chars = 0

    def add_result(self, assign: worker_pb2.Assign, result: ToolResult) -> None:
        if self._results is None:
            self._results = worker_pb2.ConnectRequest()
        report = self._results.results.results.add(
            dispatch_id=assign.dispatch_id, call_id=assign.call_id, attempt=assign.attempt
        )
        result = bound_result(result)
        try:
            wire.result_to_proto(result, report.result)
        except Exception as exc:  # a plugin's result the wire cannot carry: still one whole answer
            log.exception("the result of call %s (%s) cannot be sent", assign.call_id, assign.tool_name)
            report.result.Clear()
            wire.result_to_proto(ToolResult.error(
                ErrorKind.INTERNAL, f"{assign.tool_name}'s result could not be sent: {type(exc).__name__}: {exc}",
                run_time=result.run_time), report.result)
        chars = len(result.output)
        if result.metadata:
            metadata_chars = len(report.result.metadata_json)
            if metadata_chars > wire.MAX_METADATA_JSON_CHARS:
                report.result.metadata_json = json.dumps(wire.omitted_metadata(metadata_chars))
            chars += min(metadata_chars, wire.MAX_METADATA_JSON_CHARS)
        self._results_chars += chars
        if self._results_chars > MAX_RESULTS_CHARS_PER_MESSAGE:  # full: the next results start another
            self._messages.append(self._results)
            self._results, self._results_chars = None, 0

    def queue(self, message: worker_pb2.ConnectRequest) -> None:
        """Queues a message (sent by the next flush, before any result added after it)."""
        self._messages.append(message)

    async def send(self, message: worker_pb2.ConnectRequest) -> None:
        self.queue(message)
        await self.flush()

    async def flush(self) -> None:
        if self.lock.locked():
            return
        async with self.lock:
            await self._write_queued()

    async def close(self) -> None:
        """Writes what is queued, then half-closes the stream."""
        async with self.lock:
            await self._write_queued()
            await self._call.done_writing()

    async def _write_queued(self) -> None:
        while self._messages or self._results is not None:
            if self._messages:
                await self._call.write(self._messages.pop(0))
            if self._results is not None:
                message, self._results, self._results_chars = self._results, None, 0
                await self._call.write(message)


class ToolWorker:
    def __init__(self, config: WorkerConfig, registry: ToolRegistry, telemetry: WorkerTelemetry | None = None) -> None:
        self.config = config
        self.registry = registry
        self.telemetry = telemetry
        self._draining = asyncio.Event()
        # Calls running now, by the hub's dispatch id (model call ids repeat across sessions).
        self._running: dict[str, asyncio.Task[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        # Given by the hub's Welcome: proves it is us when we reconnect after a broken stream.
        self._reconnect_token = ""
        # Why the hub could not be reached (or refused us), logged once a minute while it lasts.
        self._told = log_context.Repeats(UNREACHABLE_LOG_INTERVAL)
        # When the hub last said it was shutting down (None once connected again): while it
        # restarts, nothing listens, which is then no news.
        self._hub_stopped_at: float | None = None
        # Whether a hub message of a kind this worker does not know was logged (once is enough).
        self._unknown_told = False
        self._cas_channel: grpc.aio.Channel | None = None
        self._cas_address = ""
        self._roots = tuple(config.roots)
        self.workspaces = WorkspaceManager(
            roots=self._roots, cache_dir=os.path.join(config.cache_dir, "workspaces"), cache_size=config.cache_size,
            on_change=self._holding_changed,
        )
        self._outbox: _Outbox | None = None
        self._reports: set[asyncio.Task[None]] = set()

    def request_drain(self) -> None:
        self._draining.set()

    @property
    def active_calls(self) -> int:
        return len(self._running)

    def hello(self) -> worker_pb2.Hello:
        return worker_pb2.Hello(
            worker_id=self.config.worker_id,
            version=__version__,
            labels=self.config.labels,
            tools=[wire.spec_to_proto(s) for s in self.registry.specs(Lane.QUERY)],
            slots=self.config.slots,
            workspace_roots=self.config.roots,
            hostname=socket.gethostname(),
            reconnect_token=self._reconnect_token,
            holdings=[snapshot_wire.holding_to_proto(h) for h in self.workspaces.holdings.values()],
        )

    async def run(self) -> int:
        """Connects, serves, reconnects; returns the process exit code."""
        log_context.worker_id.set(self.config.worker_id)
        delay = BACKOFF_INITIAL
        watchdog = asyncio.create_task(self._watch_parent()) if self.config.parent_pid is not None else None
        channel = create_channel(
            self.config.address, tls_ca=self.config.tls_ca, tls_cert=self.config.tls_cert, tls_key=self.config.tls_key
        )
        id_taken_since: float | None = None
        closed_in_handshake = hello_races = 0
        try:
            while not self._draining.is_set():
                started = time.monotonic()
                try:
                    await self._serve(channel)
                    id_taken_since = None
                    hello_races = 0
                    if self._draining.is_set():
                        return 0
                except UnusableWelcome as exc:
                    say(PROG, str(exc))
                    return EXIT_REJECTED
                except HelloRaced as exc:
                    # The next attempt hears the hub's own answer: said quietly the first time, as
                    # a warning when it keeps happening.
                    hello_races += 1
                    self._count_connection("unavailable")
                    log.log(logging.DEBUG if hello_races == 1 else logging.WARNING,
                            "the hub ended our stream while we said Hello (%s): retrying", status_line(exc.__cause__))
                    if hello_races == 1:
                        continue
                except WorkerRejected as exc:
                    self._count_connection("rejected")
                    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                        say(PROG, f"the hub refused our token (UNAUTHENTICATED): {exc}")
                        return EXIT_UNAUTHENTICATED
                    if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                        # Our own previous stream may still be held by a hub that has not noticed
                        # it broke (it will within its heartbeat timeout); another live worker
                        # with our id will not go away.
                        id_taken_since = id_taken_since or time.monotonic()
                        if time.monotonic() - id_taken_since > ID_TAKEN_PATIENCE:
                            say(PROG, str(exc))
                            return EXIT_REJECTED
                        # Said once a minute, as a refusal that stands, not at every attempt.
                        why = str(exc)
                        log.log(logging.DEBUG if self._told.lately(why) else logging.WARNING, "%s; retrying", why)
                    else:
                        say(PROG, f"the hub rejected this worker ({exc.code.name}): {exc}")
                        return EXIT_REJECTED
                except grpc.aio.AioRpcError as exc:
                    if self._draining.is_set():
                        # Stopping already (a SIGTERM, as a server gives its local workers before
                        # it ends their streams): the end is no fault to retry. grpc.aio often
                        # reports INTERNAL "Internal error from Core" in place of the hub's status.
                        log.info("hub at %s ended our stream while this worker stops (%s)", self.config.address,
                                 status_line(exc))
                        return 0
                    hello_races = 0
                    self._count_connection("unavailable")
                    refusal = tls_refusal(exc)
                    if refusal is not None:
                        # What to do, in the CLI's words (gRPC's own ended "...WRONG_VERSION_NUMBER:
                        # Invalid certificate verification context: OK" for a hub without TLS).
                        why = unreachable(self.config.address, refusal, True)
                        if "TLS" not in why:  # no advice for this one: gRPC's words
                            why = f"the TLS handshake with {self.config.address} failed: {refusal}"
                        say(PROG, why)
                        return EXIT_UNAUTHENTICATED
                    # A hub that requires client certificates (mTLS) and refuses ours just closes
                    # the connection during the handshake; a hub that is down refuses to connect.
                    closed_in_handshake = closed_in_handshake + 1 if self._closed_in_handshake(exc) else 0
                    if closed_in_handshake >= HANDSHAKE_CLOSES:
                        say(PROG, f"the hub at {self.config.address} closed the connection during the TLS handshake "
                                  f"{HANDSHAKE_CLOSES} times in a row: it does not accept this worker's certificate "
                                  f"({self._certificate_hint()})")
                        return EXIT_UNAUTHENTICATED
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (exc.details() or ""):
                        # No stream at all (nothing listens, say): why, in the CLI's words, and once a
                        # minute while it stays so, not at every attempt.
                        why = unreachable(self.config.address, exc.details() or "", self.config.tls_ca is not None)
                        quiet = closed_in_handshake or self._told.lately(why)
                        # Within a minute of the hub saying it stops, a restart is the likely
                        # reason: said at INFO; past that, or unheard of, it is a WARNING.
                        restarting = (self._hub_stopped_at is not None
                                      and time.monotonic() - self._hub_stopped_at < UNREACHABLE_LOG_INTERVAL)
                        if restarting:
                            why += " (the hub said it was shutting down: a restart?)"
                        log.log(logging.DEBUG if quiet else logging.INFO if restarting else logging.WARNING,
                                "%s; retrying", why)
                    elif exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        # Another service, or a server's health port: said as clients say it (it
                        # was "ended our stream (UNIMPLEMENTED: Method not found!)"). Still retried:
                        # the port may yet be given to a codelane server.
                        log.warning("%s answers gRPC but has no codelane worker hub (UNIMPLEMENTED: %s): is it a "
                                    "server's --health-listen port, or another service? Give the address the server "
                                    "listens on (--listen); retrying", self.config.address, exc.details())
                    else:
                        # A hub that is stopping (a restart, `codelane run --embedded` at its end)
                        # says so: no fault of ours or its, so not a warning. Still retried. A
                        # refusal that stands (a pool at --max-tools, a tool spec conflict) is said
                        # once a minute, as above, not at every attempt of the backoff.
                        stopping = exc.code() == grpc.StatusCode.UNAVAILABLE and error_reason(exc) == "SHUTTING_DOWN"
                        if stopping:
                            self._hub_stopped_at = time.monotonic()
                        why = f"hub at {self.config.address} ended our stream ({status_line(exc)})"
                        quiet = closed_in_handshake or self._told.lately(why)
                        log.log(logging.DEBUG if quiet else logging.INFO if stopping else logging.WARNING,
                                "%s: retrying", why)
                if time.monotonic() - started > BACKOFF_MAX:
                    delay = BACKOFF_INITIAL  # the last connection was healthy for a while
                # Full jitter: many workers of a restarted hub do not reconnect in lockstep.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._draining.wait(), random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX)
            return 0
        finally:
            if watchdog is not None:
                watchdog.cancel()
            await channel.close()
            if self._cas_channel is not None:
                await self._cas_channel.close()
            self.workspaces.close()

    def _count_connection(self, result: str) -> None:
        if self.telemetry is not None:
            self.telemetry.metrics.connections.labels(result).inc()

    def _closed_in_handshake(self, exc: grpc.aio.AioRpcError) -> bool:
        details = (exc.details() or "").lower()
        return bool(self.config.tls_ca) and "failed to connect" in details and "socket closed" in details

    def _certificate_hint(self) -> str:
        if not self.config.tls_cert:
            return "it sent none: give one signed by the hub's --tls-ca with --tls-cert and --tls-key"
        return f"{self.config.tls_cert} is not signed by a CA the hub trusts (its --tls-ca)"

    async def _watch_parent(self) -> None:
        """A local worker leaves with the server that started it, connected or not."""
        while os.getppid() == self.config.parent_pid:  # noqa: ASYNC110 (no event exists for a parent's death)
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.info("parent process %s is gone: draining", self.config.parent_pid)
        self._draining.set()

    async def _serve(self, channel: grpc.aio.Channel) -> None:
        stub = worker_pb2_grpc.WorkerHubServiceStub(channel)
        call = stub.Connect(metadata=bearer_metadata(self.config.token))
        outbox = _Outbox(call)
        try:
            # The hub may refuse the stream before the Hello's write completes: the refusal then
            # comes out of the write.
            try:
                await outbox.send(worker_pb2.ConnectRequest(hello=self.hello()))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == _CORE_ERROR:
                    raise HelloRaced() from exc
                raise
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REJECTIONS:
                raise WorkerRejected(exc.code(), exc.details() or "") from None
            raise
        if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
            code = await call.code()
            if code in _REJECTIONS:
                raise WorkerRejected(code, await call.details())
            return
        interval = heartbeat_interval(first.welcome)
        self._reconnect_token = first.welcome.reconnect_token
        self._told.forget()  # connected: the next outage is told at once
        self._hub_stopped_at = None
        try:
            self._use_content(first.welcome.content, channel)
        except ValueError as exc:
            raise UnusableWelcome(f"the hub's Welcome cannot be used: {exc}") from None
        self._outbox = outbox
        log.info("connected to %s as %s", self.config.address, first.welcome.worker_id)
        self._count_connection("welcomed")
        if self.telemetry is not None and not self._draining.is_set():
            self.telemetry.set_ready(True)
        heartbeat = asyncio.create_task(self._heartbeat(outbox, interval))
        drain_watch = asyncio.create_task(self._announce_drain(outbox))
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(call, outbox, ended))
        try:
            await ended  # None when the hub ends the stream; the error if it broke
        finally:
            if self.telemetry is not None:
                self.telemetry.set_ready(False)
            self._outbox = None
            heartbeat.cancel()
            drain_watch.cancel()
            self._reader.cancel()
            for task in self._running.values():
                task.cancel()
            self._running.clear()  # the calls of this stream: their results cannot be sent

    async def _read(self, call: grpc.aio.StreamStreamCall, outbox: _Outbox, ended: asyncio.Future[None]) -> None:
        """Reads the hub's messages until the stream ends, then resolves `ended`."""
        while True:
            try:
                message = await call.read()
            except Exception as exc:  # the stream broke: _serve raises it and run() reconnects
                if not ended.done():
                    ended.set_exception(exc)
                return
            if message is grpc.aio.EOF:
                if not ended.done():
                    ended.set_result(None)
                return
            kind = message.WhichOneof("message")
            if kind == "assignments":
                assigns = message.assignments.assigns
                if len(assigns) == 1 and not self._running:
                    # An idle worker given one call: latency is what counts. This task runs
                    # the call at once and a new task takes over the reading, which saves the
                    # call a trip through the event loop (Python 3.11 has no eager tasks); a
                    # tool's asyncio.timeout() still binds to a task that is the call's alone.
                    self._reader = asyncio.create_task(self._read(call, outbox, ended))
                    self._running[assigns[0].dispatch_id] = asyncio.current_task()
                    await self._run_call(assigns[0], outbox)
                    return
                if self._take(assigns, outbox):
                    await outbox.flush()
                # The calls just started take their first step (a quick tool: its whole run
                # and its result's write) before this task sets up its next read.
                await asyncio.sleep(0)
            elif kind == "cancel":
                # Popped here too: a task cancelled before its first step never runs its
                # `finally`.
                task = self._running.pop(message.cancel.dispatch_id, None)
                if task is not None:
                    task.cancel()
            elif kind == "drain":
                log.info("hub asked us to drain: %s", message.drain.reason)
                self._draining.set()
            elif kind is None and not self._unknown_told:
                # Ignored (the stream goes on); but a hub that sends it expects an answer: one
                # before 2026-12-03 probes what the worker sees of each workspace, and routes no
                # call to a worker that never answers, which would otherwise stay connected and idle
                # without a word here.
                self._unknown_told = True
                log.warning("the hub sent a message this worker does not know (it ignores it): the server runs "
                            "another codelane release, and may route this worker no calls; run one release on both")

    def _take(self, assigns: Iterable[worker_pb2.Assign], outbox: _Outbox) -> bool:
        """Starts the calls the hub's credit allows; True when some were refused (their results
        are queued in the outbox).

        The hub never has more calls outstanding than our slots, nor two with one dispatch id: a
        hub that does is broken or hostile, and the worker holds to its own limits either way.
        A call beyond the slots is answered at once, unrun; a second Assign of a running id is
        dropped (running it would answer one id twice and put the first run beyond any Cancel).
        """
        refused = duplicates = 0
        for assign in assigns:
            if assign.dispatch_id in self._running:
                duplicates += 1
            elif len(self._running) >= self.config.slots:
                refused += 1
                outbox.add_result(assign, ToolResult.error(
                    ErrorKind.AT_CAPACITY,
                    f"{assign.tool_name} was not run: this worker runs at most {self.config.slots} calls at once "
                    f"(its Hello's slots) and the hub sent more than that",
                ))
            else:
                self._start(assign, outbox)
        if refused or duplicates:
            log.warning("the hub broke its credit: %d calls beyond our %d slots answered unrun, %d assigns of "
                        "running dispatch ids dropped", refused, self.config.slots, duplicates)
        return refused > 0

    def _start(self, assign: worker_pb2.Assign, outbox: _Outbox) -> None:
        # The call's task leaves `_running` itself (a done-callback would cost every call an
        # extra event-loop turn).
        self._running[assign.dispatch_id] = asyncio.create_task(self._run_call(assign, outbox))

    async def _run_call(self, assign: worker_pb2.Assign, outbox: _Outbox) -> None:
        key = assign.dispatch_id
        observed = self.telemetry.call(assign) if self.telemetry is not None else None
        try:
            started = time.perf_counter()
            try:
                result = await self._run_on_snapshot(assign)
            except asyncio.CancelledError:
                result = ToolResult.error(ErrorKind.CANCELLED, f"{assign.tool_name} was cancelled on the worker",
                                          run_time=time.perf_counter() - started)
            except Exception as exc:  # never lose a call to a bug: the hub gets a result either way
                log.exception("call %s (%s) failed", assign.call_id, assign.tool_name)
                result = ToolResult.error(ErrorKind.INTERNAL, f"{assign.tool_name} failed on the worker: "
                                          f"{type(exc).__name__}: {exc}", run_time=time.perf_counter() - started)
            # Its slot is free once its answer is queued: the hub may get the answer and send the
            # next call while this task is still writing (other calls' answers, too), and that
            # call must find the slot free.
            self._release(key)
            outbox.add_result(assign, result)
            if observed is not None:
                observed.end(result)
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                if self._running:
                    # Siblings are running: give those finishing in this same loop turn the
                    # chance to join this write. A lone call is answered at once.
                    await asyncio.sleep(0)
                await outbox.flush()
        finally:
            self._release(key)

    def _release(self, dispatch_id: str) -> None:
        if self._running.get(dispatch_id) is asyncio.current_task():
            del self._running[dispatch_id]

    async def _run_on_snapshot(self, assign: worker_pb2.Assign) -> ToolResult:
        snapshot = snapshot_wire.snapshot_from_proto(assign.snapshot)
        if snapshot is None or snapshot.workspace != assign.workspace:
            return ToolResult.error(
                ErrorKind.INTERNAL,
                f"{assign.tool_name} was not run: its Assign names no valid snapshot of {assign.workspace} "
                "(a hub older than this worker?)",
            )
        started = time.perf_counter()
        try:
            placement = await self.workspaces.place(snapshot)
        except SnapshotChanged as exc:
            self._count_placement("unavailable", started)
            return ToolResult.error(ErrorKind.SNAPSHOT_CHANGED, f"{assign.tool_name} was not run: {exc}")
        except WorkspaceUnavailable as exc:
            self._count_placement("unavailable", started)
            return ToolResult.error(ErrorKind.TOOL_ERROR, f"{assign.tool_name} was not run on this worker: {exc}")
        self._count_placement("synced" if placement.mapped else "shared", started)
        try:
            result = await self.registry.execute(
                assign.tool_name, placement.path, placement.arguments(assign.arguments_json),
                tuple(assign.denied_paths),  # relative globs: they hold on a synced copy as on the original
            )
        finally:
            placement.release()
        return placement.result(result)

    def _count_placement(self, mode: str, started: float) -> None:
        if self.telemetry is not None:
            self.telemetry.metrics.placements.labels(mode).inc()
            self.telemetry.metrics.placement_time.observe(time.perf_counter() - started)

    def _use_content(self, content: worker_pb2.ContentSource, channel: grpc.aio.Channel) -> None:
        """Where snapshots come from: the hub itself (this channel, this token) or another CAS."""
        if content.address:
            if self._cas_channel is None or self._cas_address != content.address:
                address = content.address.removeprefix("grpc://").removeprefix("grpcs://")
                if content.address.startswith("grpcs://"):
                    self._cas_channel = create_channel(address, tls_ca=self.config.tls_ca)
                else:
                    self._cas_channel = create_channel(address)
                self._cas_address = content.address
            cas = CasClient(self._cas_channel, instance_name=content.instance_name,
                            max_batch_bytes=content.max_batch_bytes)
        else:
            cas = CasClient(channel, instance_name=content.instance_name,
                            metadata=bearer_metadata(self.config.token), max_batch_bytes=content.max_batch_bytes)
        self.workspaces.configure(cas, tuple(content.exclude))

    def _holding_changed(self, holding: Holding) -> None:
        outbox = self._outbox
        if outbox is None:
            return  # the next Hello carries it
        # Queued now, not in the task: a call placed on this holding finishes after it, and its
        # result must not reach the hub before the holding does (the hub routes by both).
        outbox.queue(worker_pb2.ConnectRequest(
            holdings=worker_pb2.Holdings(workspaces=[snapshot_wire.holding_to_proto(holding)])
        ))

        async def send() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await outbox.flush()

        task = asyncio.get_running_loop().create_task(send())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _heartbeat(self, outbox: _Outbox, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            try:
                await outbox.send(
                    worker_pb2.ConnectRequest(
                        heartbeat=worker_pb2.Heartbeat(active_calls=len(self._running), load_average=load)
                    )
                )
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the stream is gone: the reader sees it end, and we reconnect
            except Exception:
                log.exception("sending a heartbeat failed; trying again next interval")

    async def _announce_drain(self, outbox: _Outbox) -> None:
        """On drain (SIGTERM or the hub's Drain): tell the hub, finish the running calls, then
        half-close the stream; the hub then ends it and the read loop sees EOF."""
        await self._draining.wait()
        if self.telemetry is not None:
            self.telemetry.set_ready(False)
        await outbox.send(worker_pb2.ConnectRequest(draining=worker_pb2.Draining(reason="worker draining")))
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        await outbox.close()  # the last calls' results may still be queued


def heartbeat_interval(welcome: worker_pb2.Welcome) -> float:
    """The interval the hub asks for (DEFAULT_HEARTBEAT_INTERVAL when unset), within the bounds."""
    asked = wire.seconds(welcome.heartbeat_interval) if welcome.HasField("heartbeat_interval") else 0.0
    if asked == 0:
        return DEFAULT_HEARTBEAT_INTERVAL
    return min(max(asked, MIN_HEARTBEAT_INTERVAL), MAX_HEARTBEAT_INTERVAL)


# What grpc.aio reports when a write fails in its core (see HelloRaced).
_CORE_ERROR = "Internal error from Core"
_REJECTIONS = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
)
# How long a worker keeps trying while the hub says its id is held by another stream.
ID_TAKEN_PATIENCE = 60.0
# While the hub stays unreachable for the same reason, it is logged once in this many seconds.
UNREACHABLE_LOG_INTERVAL = 60.0
# Connections the hub closes during the TLS handshake before the worker concludes it refuses the
# worker's certificate (one could be a hub going down).
HANDSHAKE_CLOSES = 3
# What gRPC's transport says when a TLS handshake fails (either side refusing a certificate).
_TLS_FAILURES = ("handshake", "certificate", "ssl_error", "tlsv1_alert", "wrong_version_number")


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason the hub ended a stream with ("" when it gave none)."""
    with contextlib.suppress(Exception):  # a status without (parsable) details has no reason
        status = rpc_status.from_call(exc)
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    return ""


def status_line(exc: grpc.aio.AioRpcError) -> str:
    """`CODE REASON: details`: the status and the ErrorInfo reason the hub ended a stream with (for
    example `UNAVAILABLE HEARTBEAT_TIMEOUT: no heartbeat for 6.1s` when it lost us for silence)."""
    reason = error_reason(exc)
    reason = f" {reason}" if reason and reason != exc.code().name else ""
    return f"{exc.code().name}{reason}: {exc.details() or 'no message'}"


def tls_refusal(exc: grpc.aio.AioRpcError) -> str | None:
    """The handshake error, when the call failed because a TLS handshake did: retrying with the
    same certificates cannot help."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and any(word in details.lower() for word in _TLS_FAILURES):
        return details
    return None


def apply_requirements(registry: ToolRegistry, required: dict[str, dict[str, str]]) -> list[str]:
    """Gives each offered tool the labels `--require` names for it; says which it names that the
    worker does not offer: a typo, or a tool its module declined (semantic_search without its
    model), which nothing else would tell apart from a requirement that holds."""
    ignored = []
    # A worker offers its Query tools only (its Hello carries no other): an Execute tool is in its
    # registry but runs on the server, so a requirement of one would hold nothing.
    offered = [spec.name for spec in registry.specs(Lane.QUERY)]
    for tool, labels in required.items():
        if tool in offered:
            registry.require_labels(tool, labels)
        else:
            ignored.append(f"--require names {tool!r}, which this worker does not offer: ignored "
                           f"(offered: {', '.join(offered)})")
    return ignored


def parse_requirement(text: str) -> tuple[str, dict[str, str]]:
    tool, sep, labels = text.partition(":")
    if not sep or not tool.strip():
        raise argparse.ArgumentTypeError(f"requirement {text!r} is not TOOL:KEY=VALUE")
    try:
        return tool.strip(), types.parse_labels(labels)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = types.parser("codelane worker", "Run a codelane tool worker.")
    parser.add_argument("--connect", required=True, type=types.address, metavar="HOST:PORT",
                        help="address of the session server's hub")
    parser.add_argument(
        "--token",
        default=os.environ.get("CODELANE_WORKER_TOKEN"),
        type=types.bearer_token,
        help="bearer token for the hub (default: $CODELANE_WORKER_TOKEN)",
    )
    parser.add_argument("--slots", type=types.positive_int, default=4, help="calls run at once (default 4)")
    parser.add_argument("--labels", type=types.labels, default={}, help="routing labels, e.g. gpu=true,zone=eu")
    parser.add_argument("--root", action="append", default=[], type=types.existing_dir,
                        help="directory under which the server's workspace paths may be used directly when this "
                        "host sees the same files (repeatable; none: any path). Other workspaces are synced into "
                        "--cache-dir")
    parser.add_argument("--cache-size", type=types.positive_size, default=DEFAULT_CACHE_SIZE,
                        help="bound of the disk the cache's synced workspaces and blobs take, each file counted "
                             "in whole 4 KiB blocks and each directory as one, e.g. 10GiB (default 10GiB)")
    parser.add_argument(
        "--tools",
        action="append",
        default=[],
        metavar="MODULE",
        help="Python module with extra tools (TOOLS = [...]); repeatable",
    )
    parser.add_argument(
        "--cache-dir",
        type=types.directory_to_make("/var/cache/codelane"),
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codelane",
        help="where this worker keeps synced workspaces (workspaces/, bounded by --cache-size) and its tools their "
        "caches, e.g. the semantic_search index (default ~/.cache/codelane)",
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        type=parse_requirement,
        metavar="TOOL:KEY=VALUE[,KEY=VALUE]",
        help="labels a worker must carry to be sent calls of TOOL, e.g. semantic_search:accelerator=gpu (repeatable)",
    )
    parser.add_argument(
        "--id",
        dest="worker_id",
        default=f"{socket.gethostname()}/{os.getpid()}",
        help="worker id, unique in the pool (default host/pid)",
    )
    parser.add_argument("--tls-ca", type=types.readable_file, help="CA certificate to verify the hub (enables TLS)")
    parser.add_argument("--tls-cert", type=types.readable_file, help="client certificate for mTLS")
    parser.add_argument("--tls-key", type=types.readable_file, help="client key for mTLS")
    parser.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="run Query tools' processes (ripgrep) unconfined on a host without Landlock (default: they fail)",
    )
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--health-listen", metavar="HOST:PORT",
                        help="serve gRPC health on HOST:PORT (plaintext): SERVING while connected to the hub and "
                             "taking calls, for readiness probes (default: off)")
    parser.add_argument("--otlp-endpoint", type=types.otlp_endpoint, metavar="URL",
                        help="send traces over OTLP/gRPC, e.g. http://collector:4317 (default: the standard "
                             "OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text, or json: one object per line with worker_id, and call_id, session_id and "
                             "trace_id while a call runs")
    parser.add_argument("--log-level", type=types.log_level, default="INFO", metavar="LEVEL",
                        help=f"what the worker logs to stderr ({', '.join(types.LOG_LEVELS)}); INFO says when it "
                             "connects")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        # Without a CA the channel is plaintext, and the certificate would go unused, unsaid.
        print("codelane worker: a client certificate (mTLS) needs TLS: give --tls-ca too (the CA that signed "
              "the hub's certificate)", file=sys.stderr)
        return 2
    try:
        configure_logging(args.log_level, args.log_format, "%(asctime)s worker %(levelname)s %(message)s")
        # Every line names the worker (--log-format json says so), not only those of run(): a
        # server's local workers share its stderr, and their drains on SIGTERM said none.
        log_context.worker_id.set(args.worker_id)
        for address in (args.metrics_listen, args.health_listen):
            if address:
                split_address(address)
        # gRPC would take a file it cannot use for a hub that does not answer, and retry forever.
        check_tls_files(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    except ValueError as exc:
        say(PROG, str(exc))
        return 2
    registry = ToolRegistry.builtin(Sandbox(SandboxSettings(allow_unsandboxed=args.allow_unsandboxed)))
    required: dict[str, dict[str, str]] = {}
    for tool, labels in args.require:
        required.setdefault(tool, {}).update(labels)
    host = ToolHost(cache_dir=args.cache_dir, labels=dict(args.labels), required_labels=required)
    try:
        for module in args.tools:
            registry.load_module(module, host)
    except (ImportError, ValueError) as exc:
        say(PROG, f"cannot load tools: {exc}")
        return 2
    for warning in apply_requirements(registry, required):
        say(PROG, warning, logging.WARNING)
    config = WorkerConfig(
        address=args.connect,
        worker_id=args.worker_id,
        slots=args.slots,
        token=args.token,
        labels=host.labels,
        roots=[os.path.realpath(r) for r in args.root],
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        parent_pid=args.parent_pid,
        metrics_listen=args.metrics_listen,
        health_listen=args.health_listen,
        otlp_endpoint=args.otlp_endpoint,
        cache_dir=str(args.cache_dir),
        cache_size=args.cache_size,
    )
    return asyncio.run(_run(config, registry))


async def _run(config: WorkerConfig, registry: ToolRegistry) -> int:
    with pidfd_child_watcher():
        return await _run_until_stopped(config, registry)


async def _run_until_stopped(config: WorkerConfig, registry: ToolRegistry) -> int:
    metrics = WorkerMetrics(config.slots)
    telemetry = WorkerTelemetry(
        config.worker_id, metrics, start_tracing(config.otlp_endpoint, "codelane-worker", config.worker_id)
    )
    worker = ToolWorker(config, registry, telemetry)
    metrics.in_flight.set_function(lambda: worker.active_calls)
    loop = asyncio.get_running_loop()
    running = asyncio.current_task()
    stopped_by: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        # The first signal drains, which waits for the running calls however long they take: an
        # operator is told so, and a second signal (a second Ctrl-C) stops at once, as a kill
        # would: the hub retries the idempotent calls elsewhere and ends the others WORKER_LOST.
        stopped_by.append(sig)
        if len(stopped_by) == 1:
            log.info("%s: draining: no new calls; exiting once the %d running call(s) end (a second SIGTERM or "
                     "SIGINT stops at once)", sig.name, worker.active_calls)
            worker.request_drain()
        elif len(stopped_by) == 2 and running is not None:
            log.warning("%s again: stopping now, leaving %d running call(s) to the hub", sig.name, worker.active_calls)
            running.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    endpoint = health_server = None
    try:
        # The ports on stdout, as the server prints its own: with port 0 the kernel picks them,
        # and nothing else would tell a script (or a probe's configuration) which.
        if config.metrics_listen:
            endpoint = MetricsEndpoint(config.metrics_listen, metrics.registry)
            print(f"codelane worker metrics on port {await endpoint.start()}", flush=True)
        if config.health_listen:
            telemetry.set_ready(False)
            health_server, health_port = await serve_health(config.health_listen, telemetry.health)
            print(f"codelane worker health on port {health_port}", flush=True)
    except OSError as exc:
        # Not a usage error (2) nor the hub's refusal: 1, as the server exits on a busy port.
        say(PROG, str(exc))
        return 1
    freeze_startup_heap()
    try:
        return await worker.run()
    except asyncio.CancelledError:
        if len(stopped_by) < 2:
            raise
        return 128 + stopped_by[-1]  # as a shell reports a process its signal ended
    finally:
        if endpoint is not None:
            await endpoint.stop()
        if health_server is not None:
            await health_server.stop(None)
        if telemetry.tracing is not None:
            await asyncio.to_thread(telemetry.tracing.shutdown)
