"""The worker pool places Query calls on connected workers and gets each one its result.

Domain logic only. The gRPC servicer (`session_server.api.hub`) registers each connected worker
with a `WorkerLink` (how to send it messages) and feeds its messages in; `dispatch()` returns the
call's result, always, within the call's deadline.

The pool only places calls. Who owns a call hears where it went through its `PlacementObserver`;
the pool emits no events and knows nothing of sessions beyond their id (for fairness).

Guarantees:
- credit: never more calls outstanding on a worker than its slots;
- routing (`routing.Router`): only to workers offering the tool and carrying its required labels,
  preferring those that hold the call's workspace snapshot;
- fairness (`fairness.FairQueues`): free slots go round-robin across sessions;
- identity: each attempt of each call has its own dispatch id, so calls whose model-given ids
  collide (two sessions replaying one script) never meet;
- loss: calls of a lost worker are re-dispatched when idempotent (bounded attempts), otherwise end
  with an error; a call left with no capable worker ends after a bounded wait;
- liveness (`check()`, run by a monitor task that survives its own failures): silent workers are
  dropped, orphaned calls give up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from session_server.pool.fairness import FairQueues
from session_server.pool.routing import Router
from session_server.pool.types import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_NO_WORKER_WAIT,
    Assignment,
    LinkFault,
    PoolClosed,
    QueryCall,
    TooManyTools,
    WorkerLink,
    WorkerRegistration,
    WorkerSnapshot,
)
from session_server.pool.workers import Worker, WorkerDirectory
from tool_worker.merkle import Holding
from tool_worker.tools.base import ErrorKind, ToolResult, ToolSpec

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Pending:
    """One call from dispatch to result, across its attempts."""

    call: QueryCall
    future: asyncio.Future[ToolResult]
    enqueued: float
    attempt: int = 1
    # The current attempt on a worker, when it has one.
    assignment: Assignment | None = None
    worker: Worker | None = None
    started: float = 0.0
    orphaned_since: float | None = None
    deadline_timer: asyncio.TimerHandle | None = None

    @property
    def session_id(self) -> str:
        return self.call.session_id


class WorkerPool:
    """Routes Query calls to connected workers. One per session server; one event loop.

    `clock` (monotonic seconds) drives liveness and views; tests pass their own and call
    `check()` instead of waiting for the monitor.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        no_worker_wait: float = DEFAULT_NO_WORKER_WAIT,
        clock: Callable[[], float] = time.monotonic,
        on_worker_lost: Callable[[str], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        server_execute_tools: frozenset[str] = frozenset(),
        server_tools: frozenset[str] = frozenset(),
        max_tools: int = 0,
    ) -> None:
        # Three heartbeats fit in the timeout whatever the operator chose: a timeout under the
        # default interval (--heartbeat-timeout 1) had every idle worker dropped between two
        # heartbeats, and reconnecting, about once a second.
        self.heartbeat_interval = min(heartbeat_interval, heartbeat_timeout / 3)
        self.heartbeat_timeout = heartbeat_timeout
        self.no_worker_wait = no_worker_wait
        self._clock = clock
        # Names a worker may not offer (the server runs these tools itself, one at a time); every
        # name the server offers itself; the most names it and its workers may offer together.
        self._workers = WorkerDirectory(clock, server_execute_tools, server_tools, max_tools)
        self._router = Router()
        self._queued: FairQueues[Pending] = FairQueues()
        # Dispatch ids: this pool's random prefix, so ids never repeat across server restarts.
        self._dispatch_prefix = secrets.token_hex(3)
        self._dispatch_numbers = itertools.count(1)
        self._monitor: asyncio.Task[None] | None = None
        self._pumping = False
        self._closed = False
        # Hears the cause of each worker that leaves, and the limit of each refused (for metrics).
        self._on_worker_lost = on_worker_lost
        self._on_refused = on_refused

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="worker-pool-monitor")

    async def close(self) -> None:
        self._closed = True
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        shutting_down = ToolResult.error(ErrorKind.CANCELLED, "the session server is shutting down")
        for pending in list(self._queued):
            self._finish(pending, shutting_down)
        for worker in list(self._workers):
            for pending in list(worker.in_flight.values()):
                self._finish(pending, shutting_down)
            worker.link.close("the session server is shutting down", LinkFault.SHUTTING_DOWN)
            self._workers.remove(worker)

    # -- workers -------------------------------------------------------------------------------

    def register(self, reg: WorkerRegistration, link: WorkerLink) -> str:
        """Adds a worker (after its Hello) and returns its reconnect token.

        Raises InvalidRegistration for a bad Hello, WorkerIdTaken when a live stream holds the id,
        PoolClosed once the pool is closed.
        """
        if self._closed:
            raise PoolClosed
        try:
            old = self._workers.holder(reg)
        except TooManyTools:
            if self._on_refused:
                self._on_refused("max_tools")
            raise
        if old is not None:
            self._lose(old, "its connection was replaced by the worker's reconnection", "replaced")
            old.link.close("replaced by the worker's reconnection", LinkFault.REPLACED)
        worker = self._workers.add(reg, link)
        self._pump()
        return worker.reconnect_token

    def tool_usage(self) -> tuple[int, int]:
        """(tool names offered to models now, the most that may be: --max-tools, 0 for none)."""
        return self._workers.tool_usage()

    def unregister(self, worker_id: str, link: WorkerLink, reason: str, cause: str = "disconnected") -> None:
        """The worker's stream ended (`cause`: a short code, e.g. "drained", "stream_broken").
        Ignored if that stream was already replaced."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.link is link:
            self._lose(worker, reason, cause)

    def _live(self, worker_id: str, link: WorkerLink) -> Worker | None:
        """The worker, if `link` is still its stream: a replaced stream is fenced off."""
        worker = self._workers.get(worker_id)
        return worker if worker is not None and worker.link is link else None

    def heartbeat(self, worker_id: str, link: WorkerLink) -> None:
        worker = self._live(worker_id, link)
        if worker is not None:
            worker.last_seen = self._clock()

    def worker_draining(self, worker_id: str, link: WorkerLink) -> None:
        worker = self._live(worker_id, link)
        if worker is not None:
            worker.draining = True
            worker.last_seen = self._clock()

    def drain(self, worker_id: str, reason: str = "drain requested") -> WorkerSnapshot:
        """Asks a worker to drain. KeyError for an unknown worker."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise KeyError(worker_id)
        worker.draining = True
        worker.link.drain(reason)
        return self._workers.snapshot(worker)

    def workers(self, after: str = "", limit: int | None = None) -> list[WorkerSnapshot]:
        """Connected workers by id: those whose id sorts after `after`, at most `limit`."""
        following = sorted((w for w in self._workers if w.id > after), key=lambda w: w.id)
        return [self._workers.snapshot(w) for w in following[:limit]]

    def worker(self, worker_id: str) -> WorkerSnapshot | None:
        worker = self._workers.get(worker_id)
        return self._workers.snapshot(worker) if worker else None

    def offers(self, tool_name: str) -> bool:
        return self._workers.offers(tool_name)

    def offered_tools(self) -> dict[str, ToolSpec]:
        return self._workers.offered_tools()

    def in_flight(self, worker_id: str) -> int:
        """Calls outstanding on a worker (0 for an unknown one)."""
        worker = self._workers.get(worker_id)
        return len(worker.in_flight) if worker else 0

    def capacity(self) -> tuple[int, int]:
        return self._workers.capacity()

    def waiting(self) -> list[tuple[dict[str, str], float]]:
        """The calls waiting for a worker slot: the worker labels each needs (its own and its
        tool's), and how long it has waited, in seconds."""
        now = self._clock()
        offered = self._workers.offered_tools()
        waiting = []
        for pending in self._queued:
            spec = offered.get(pending.call.tool_name)
            labels = {**(spec.required_labels if spec is not None else {}), **pending.call.required_labels}
            waiting.append((labels, now - pending.enqueued))
        return waiting

    def on_holdings(self, worker_id: str, link: WorkerLink, holdings: list[Holding]) -> None:
        """The worker says what it holds of some workspaces: queued calls may prefer it now."""
        worker = self._live(worker_id, link)
        if worker is not None:
            worker.last_seen = self._clock()
            for holding in holdings:
                self._router.holds(worker, holding)

    # -- calls ---------------------------------------------------------------------------------

    async def dispatch(self, call: QueryCall) -> ToolResult:
        """Runs a call on a worker and returns its result (an error result on any failure).

        Returns an ErrorKind.NO_WORKER result at once when no connected worker can run the call,
        so the caller may run it itself. Cancelling the awaiting task withdraws the call.
        """
        if self._closed:
            return ToolResult.error(ErrorKind.CANCELLED, "the session server is shutting down")
        workers = tuple(self._workers)
        # With no call waiting anywhere there is nobody to be fair to: the call goes straight to
        # a free worker, off the queues (the common, latency-bound case).
        worker = None if self._queued else self._router.pick(workers, call)
        if worker is None and not any(self._router.capable(w, call) for w in workers):
            return self._no_worker_result(call)
        loop = asyncio.get_running_loop()
        pending = Pending(call=call, future=loop.create_future(), enqueued=self._clock(), attempt=call.first_attempt)
        pending.deadline_timer = loop.call_later(call.timeout, self._on_deadline, pending)
        if worker is None:
            self._queued.push(pending)
            self._pump()
        else:
            self._assign(worker, pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._withdraw(pending, "the call was cancelled")
            raise

    def on_result(self, worker_id: str, link: WorkerLink, dispatch_id: str, result: ToolResult) -> None:
        worker = self._live(worker_id, link)
        if worker is None:
            return
        worker.last_seen = self._clock()
        pending = worker.in_flight.pop(dispatch_id, None)
        if pending is None:
            return
        worker.completed += 1
        self._finish(
            pending,
            dataclasses.replace(
                result, worker_id=worker_id, attempt=pending.attempt, queue_wait=pending.started - pending.enqueued
            ),
        )
        self._pump()

    # -- liveness ------------------------------------------------------------------------------

    def check(self) -> None:
        """Drops silent workers and ends calls no worker can take. Each part is
        contained: one failing never stops the others, nor the monitor."""
        now = self._clock()
        for worker in list(self._workers):
            try:
                silent = now - worker.last_seen
                if silent > self.heartbeat_timeout:
                    why = f"no heartbeat or message for {silent:.1f}s (timeout {self.heartbeat_timeout:g}s)"
                    self._lose(worker, why, "heartbeat_timeout")
                    worker.link.close(f"no heartbeat for {silent:.1f}s", LinkFault.HEARTBEAT_TIMEOUT)
            except Exception:
                log.exception("checking worker %s failed", worker.id)
        for pending in list(self._queued):
            try:
                self._check_orphan(pending, now)
            except Exception:
                log.exception("checking queued call %s failed", pending.call.call_id)
        self._pump()

    def _check_orphan(self, pending: Pending, now: float) -> None:
        if any(self._router.capable(w, pending.call) for w in self._workers):
            pending.orphaned_since = None
        elif pending.attempt == 1:
            # Never ran anywhere and nobody could take it: fail fast, the caller may run it itself.
            self._withdraw(pending, "no capable worker")
            self._finish(pending, self._no_worker_result(pending.call))
        elif pending.orphaned_since is None:
            pending.orphaned_since = now
        elif now - pending.orphaned_since >= self.no_worker_wait:
            # Its worker was lost: a replacement had a bounded time to connect.
            self._withdraw(pending, "no capable worker")
            result = self._no_worker_result(pending.call)
            self._finish(pending, dataclasses.replace(
                result, output=f"{result.output} (waited {self.no_worker_wait:g}s for one to connect)",
                attempt=pending.attempt,
            ))

    async def _watch(self) -> None:
        tick = min(self.heartbeat_interval, 0.25)
        while True:
            await asyncio.sleep(tick)
            try:
                self.check()
            except Exception:
                log.exception("worker pool check failed; the monitor goes on")

    # -- internals -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hands free slots to queued calls, one call per session per round (round-robin)."""
        if self._pumping or not self._queued:
            return
        self._pumping = True
        try:
            workers = tuple(self._workers)

            def place(pending: Pending) -> bool:
                worker = self._router.pick(workers, pending.call)
                if worker is None:
                    return False
                self._assign(worker, pending)
                return True

            self._queued.serve(place, lambda: any(w.free_slots > 0 for w in workers))
        finally:
            self._pumping = False

    def _assign(self, worker: Worker, pending: Pending) -> None:
        call = pending.call
        pending.worker = worker
        pending.started = self._clock()
        pending.orphaned_since = None
        remaining = pending.enqueued + call.timeout - pending.started
        pending.assignment = Assignment(
            dispatch_id=f"{self._dispatch_prefix}-{next(self._dispatch_numbers)}",
            call_id=call.call_id,
            attempt=pending.attempt,
            tool_name=call.tool_name,
            arguments_json=call.arguments_json,
            workspace=call.workspace,
            session_id=call.session_id,
            deadline=time.time() + max(remaining, 0.0),
            denied_paths=call.denied_paths,
            traceparent=call.traceparent,
            tracestate=call.tracestate,
            snapshot=call.snapshot,
        )
        worker.in_flight[pending.assignment.dispatch_id] = pending
        worker.max_in_flight_seen = max(worker.max_in_flight_seen, len(worker.in_flight))
        worker.link.assign(pending.assignment)
        if call.observer is not None:
            call.observer.assigned(worker.id, pending.attempt)

    def _lose(self, worker: Worker, reason: str, cause: str) -> None:
        """Removes a worker; its calls are retried elsewhere or end with an error."""
        if self._on_worker_lost is not None:
            try:
                self._on_worker_lost(cause)
            except Exception:
                log.exception("reporting the loss of worker %s failed", worker.id)
        self._workers.remove(worker)
        orphans = list(worker.in_flight.values())
        worker.in_flight.clear()
        for pending in orphans:
            if pending.future.done():
                continue
            call = pending.call
            idempotent = call.idempotent and worker.tools[call.tool_name].idempotent
            retry = idempotent and pending.attempt < call.max_attempts
            if call.observer is not None:
                call.observer.lost(worker.id, reason, pending.attempt + 1 if retry else None)
            if retry:
                pending.attempt += 1
                pending.worker = pending.assignment = None
                self._queued.push_first(pending)
            else:
                why = f"tried {pending.attempt} times" if idempotent else "its tool is not idempotent: not retried"
                self._finish(
                    pending,
                    ToolResult.error(
                        ErrorKind.WORKER_LOST,
                        f"worker {worker.id} was lost while running {call.tool_name} ({reason}); {why}",
                        worker_id=worker.id,
                        attempt=pending.attempt,
                    ),
                )
        self._pump()

    def _withdraw(self, pending: Pending, reason: str) -> None:
        """Takes a call back: out of its queue, or cancelled on its worker (whose slot stays
        taken until the worker answers, so credit stays exact)."""
        if not self._queued.remove(pending) and pending.worker is not None and pending.assignment is not None:
            pending.worker.link.cancel(pending.assignment, reason)
        if pending.deadline_timer:
            pending.deadline_timer.cancel()

    def _on_deadline(self, pending: Pending) -> None:
        if pending.future.done():
            return
        call = pending.call
        where = f"on worker {pending.worker.id}" if pending.worker else "waiting for a free worker"
        result = ToolResult.error(
            ErrorKind.TIMEOUT,
            f"{call.tool_name} timed out after {call.whole_limit:g}s {where}",
            worker_id=pending.worker.id if pending.worker else "",
            attempt=pending.attempt,
        )
        self._withdraw(pending, f"deadline of {call.whole_limit:g}s exceeded")
        self._finish(pending, result)

    def _finish(self, pending: Pending, result: ToolResult) -> None:
        if pending.deadline_timer:
            pending.deadline_timer.cancel()
        if not pending.future.done():
            pending.future.set_result(result)

    def _no_worker_result(self, call: QueryCall) -> ToolResult:
        spec = self._workers.offered_tools().get(call.tool_name)
        labels = {**(spec.required_labels if spec is not None else {}), **call.required_labels}
        # Workers may offer the tool without the labels it needs: say which, or it reads as a bug.
        needs = f" (it needs a worker labelled {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))})"
        return ToolResult.error(
            ErrorKind.NO_WORKER,
            f"no connected worker can run {call.tool_name} for workspace {call.workspace}{needs if labels else ''}",
        )
