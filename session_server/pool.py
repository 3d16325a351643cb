"""The worker pool: which worker runs which Query call, and what happens when one goes away.

Domain logic only. The gRPC servicer (`session_server.api.hub`) registers each connected worker
with a `WorkerLink` (how to send it messages) and feeds its messages in; `dispatch()` returns
the call's result, always, within the call's deadline.

Guarantees:
- credit: never more calls outstanding on a worker than its slots;
- routing: only to workers offering the tool, carrying its required labels, and seeing the
  session's workspace (proved once per worker and workspace by a fingerprint probe);
- fairness: free slots go round-robin across sessions;
- loss: calls of a lost worker are re-dispatched when idempotent (bounded attempts), otherwise
  end with an error; a call left with no capable worker ends after a bounded wait.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Protocol

from session_server.events import CallRetried, WorkerLost
from tool_worker.tools.base import ErrorKind, ToolResult, ToolSpec

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_HEARTBEAT_INTERVAL = 2.0
# A worker silent for this long is lost (three missed heartbeats).
DEFAULT_HEARTBEAT_TIMEOUT = 6.0
# How long a call whose worker was lost waits for another capable worker before failing.
DEFAULT_NO_WORKER_WAIT = 5.0
DEFAULT_PROBE_TIMEOUT = 10.0


class InvalidRegistration(ValueError):
    """A worker's Hello cannot be accepted; the message says why."""


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


@dataclass(slots=True)
class Assignment:
    call_id: str
    attempt: int
    tool_name: str
    arguments_json: str
    workspace: str
    session_id: str
    deadline: float  # wall-clock seconds since the epoch
    # Globs of the paths the session's policy denies reading (worker.proto, Assign.denied_paths).
    denied_paths: tuple[str, ...] = ()


class WorkerLink(Protocol):
    """How the pool talks to one worker. Methods enqueue and return at once."""

    def assign(self, assignment: Assignment) -> None: ...

    def cancel(self, call_id: str, attempt: int, reason: str) -> None: ...

    def probe(self, probe_id: str, workspace: str) -> None: ...

    def drain(self, reason: str) -> None: ...

    def close(self, reason: str) -> None: ...

    async def flush(self) -> None:
        """Writes what is queued now, in the caller's task (the link also writes on its own)."""


# Events the pool reports about a call: the session's own CallRetried and WorkerLost, and
# CallStarted, which the session completes into a ToolCallStarted.
@dataclass(frozen=True)
class CallStarted:
    worker_id: str
    attempt: int


PoolEvent = CallStarted | CallRetried | WorkerLost


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
    timeout: float = 60.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    on_event: Callable[[PoolEvent], None] | None = None
    # Globs of the paths the session's policy denies reading (worker.proto, Assign.denied_paths).
    denied_paths: tuple[str, ...] = ()


class Visibility(enum.Enum):
    PROBING = "probing"
    VISIBLE = "visible"
    INVISIBLE = "invisible"


@dataclass
class WorkspaceView:
    state: Visibility
    reason: str = ""
    probe_id: str = ""
    probe_sent: float = 0.0


@dataclass(slots=True)
class _Pending:
    call: QueryCall
    future: asyncio.Future[ToolResult]
    enqueued: float
    attempt: int = 1
    worker: _Worker | None = None
    started: float = 0.0
    orphaned_since: float | None = None
    deadline_timer: asyncio.TimerHandle | None = None


@dataclass
class _Worker:
    reg: WorkerRegistration
    link: WorkerLink
    connected_at: float
    last_seen: float
    tools: dict[str, ToolSpec]
    # Tools whose required labels this worker carries: routing checks one set membership.
    runnable: frozenset[str]
    in_flight: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    draining: bool = False
    workspaces: dict[str, WorkspaceView] = field(default_factory=dict)
    completed: int = 0
    max_in_flight_seen: int = 0

    @property
    def free_slots(self) -> int:
        return self.reg.slots - len(self.in_flight)


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
    workspaces: dict[str, tuple[bool, str]]
    completed: int
    max_in_flight_seen: int


def validate_registration(reg: WorkerRegistration) -> None:
    if not reg.worker_id.strip():
        raise InvalidRegistration("hello.worker_id is empty: give each worker a unique id")
    if reg.slots < 1:
        raise InvalidRegistration(f"hello.slots is {reg.slots}: a worker needs at least 1 slot")
    if not reg.tools:
        raise InvalidRegistration("hello.tools is empty: a worker must offer at least one tool")
    seen: set[str] = set()
    for spec in reg.tools:
        if not spec.name:
            raise InvalidRegistration("hello.tools has a tool without a name")
        if spec.name in seen:
            raise InvalidRegistration(f"hello.tools offers {spec.name!r} twice: tool names must be unique")
        seen.add(spec.name)


def _under_roots(workspace: str, roots: Sequence[str]) -> bool:
    if not roots:
        return True
    path = PurePath(workspace)
    return any(path == PurePath(root) or PurePath(root) in path.parents for root in roots)


class WorkerPool:
    """Routes Query calls to connected workers. One per session server; single event loop."""

    def __init__(
        self,
        fingerprint: Callable[[str], str],
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        no_worker_wait: float = DEFAULT_NO_WORKER_WAIT,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self._fingerprint = fingerprint
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.no_worker_wait = no_worker_wait
        self.probe_timeout = probe_timeout
        self._workers: dict[str, _Worker] = {}
        # Pending calls per session; the dict's order is the round-robin order.
        self._queues: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._probe_ids = itertools.count(1)
        self._probes: dict[str, tuple[_Worker, str]] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._pumping = False
        self._closed = False
        # Links given calls since the last flush: the task that caused the assignment writes
        # them itself, which saves a hop to the link's writer task on every call's path.
        self._dirty: set[WorkerLink] = set()
        # Under load (a worker already busy), assignments wait one loop turn so that the calls
        # dispatched together go out in one message; an idle worker is written to at once.
        self._coalesce = False
        self._flush_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="worker-pool-monitor")

    async def close(self) -> None:
        self._closed = True
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for queue in self._queues.values():
            for pending in queue:
                self._finish(pending, ToolResult.error(ErrorKind.CANCELLED, "the session server is shutting down"))
        self._queues.clear()
        for worker in list(self._workers.values()):
            for pending in list(worker.in_flight.values()):
                self._finish(pending, ToolResult.error(ErrorKind.CANCELLED, "the session server is shutting down"))
            worker.link.close("the session server is shutting down")
        self._workers.clear()

    # -- workers -------------------------------------------------------------------------------

    def register(self, reg: WorkerRegistration, link: WorkerLink) -> None:
        """Adds a worker (after its Hello). A worker with the same id replaces the old stream."""
        validate_registration(reg)
        old = self._workers.get(reg.worker_id)
        if old is not None:
            self._lose(old, "replaced by a new connection with the same worker id")
            old.link.close("replaced by a new connection with the same worker id")
        now = time.monotonic()
        runnable = frozenset(
            t.name for t in reg.tools if all(reg.labels.get(k) == v for k, v in t.required_labels.items())
        )
        self._workers[reg.worker_id] = _Worker(
            reg=reg,
            link=link,
            connected_at=time.time(),
            last_seen=now,
            tools={t.name: t for t in reg.tools},
            runnable=runnable,
        )
        self._pump()

    def unregister(self, worker_id: str, link: WorkerLink, reason: str) -> None:
        """The worker's stream ended. Ignored if that stream was already replaced."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.link is link:
            self._lose(worker, reason)

    def heartbeat(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.last_seen = time.monotonic()

    def worker_draining(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.draining = True
            worker.last_seen = time.monotonic()

    def drain(self, worker_id: str, reason: str = "drain requested") -> WorkerSnapshot:
        """Asks a worker to drain. KeyError for an unknown worker."""
        worker = self._workers[worker_id]
        worker.draining = True
        worker.link.drain(reason)
        return self._snapshot(worker)

    def workers(self) -> list[WorkerSnapshot]:
        return [self._snapshot(w) for _, w in sorted(self._workers.items())]

    def worker(self, worker_id: str) -> WorkerSnapshot | None:
        worker = self._workers.get(worker_id)
        return self._snapshot(worker) if worker else None

    def offers(self, tool_name: str) -> bool:
        """Whether a ready worker offers the tool (cheap: asked once per call)."""
        return any(not w.draining and tool_name in w.tools for w in self._workers.values())

    def offered_tools(self) -> dict[str, ToolSpec]:
        """Tools offered by at least one ready worker (first offer wins for the spec)."""
        offered: dict[str, ToolSpec] = {}
        for worker in self._workers.values():
            if not worker.draining:
                for name, spec in worker.tools.items():
                    offered.setdefault(name, spec)
        return offered

    def in_flight(self, worker_id: str) -> int:
        """Calls outstanding on a worker (0 for an unknown one)."""
        worker = self._workers.get(worker_id)
        return len(worker.in_flight) if worker else 0

    def capacity(self) -> tuple[int, int]:
        """(total slots, calls in flight) over connected workers."""
        return (
            sum(w.reg.slots for w in self._workers.values()),
            sum(len(w.in_flight) for w in self._workers.values()),
        )

    # -- calls ---------------------------------------------------------------------------------

    async def dispatch(self, call: QueryCall) -> ToolResult:
        """Runs a call on a worker and returns its result (an error result on any failure).

        Returns an ErrorKind.NO_WORKER result at once when no connected worker can run the call,
        so the caller may run it itself. Cancelling the awaiting task withdraws the call.
        """
        if self._closed:
            return ToolResult.error(ErrorKind.CANCELLED, "the session server is shutting down")
        loop = asyncio.get_running_loop()
        # With no call waiting anywhere there is nobody to be fair to: the call goes straight to
        # a free worker, off the queues (the common, latency-bound case).
        worker = None if self._queues else self._pick(call)
        if worker is None and not any(self._capable(w, call) for w in self._workers.values()):
            return self._no_worker_result(call)
        pending = _Pending(call=call, future=loop.create_future(), enqueued=time.monotonic())
        pending.deadline_timer = loop.call_later(call.timeout, self._on_deadline, pending)
        if worker is not None:
            self._assign(worker, pending)
        else:
            self._queues.setdefault(call.session_id, deque()).append(pending)
            self._pump()
        try:
            if self._coalesce:
                self._flush_soon()
            else:
                await self.flush()
            return await pending.future
        except asyncio.CancelledError:
            self._withdraw(pending, "the call was cancelled")
            raise

    async def flush(self) -> None:
        """Writes the assignments made so far (see `_dirty`)."""
        self._coalesce = False
        while self._dirty:
            await self._dirty.pop().flush()

    def _flush_soon(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self.flush())

    def on_result(self, worker_id: str, call_id: str, attempt: int, result: ToolResult) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.last_seen = time.monotonic()
        pending = worker.in_flight.pop((call_id, attempt), None)
        if pending is None:
            return
        worker.completed += 1
        result.worker_id = worker_id
        result.attempt = attempt
        result.queue_wait = pending.started - pending.enqueued
        self._finish(pending, result)
        self._pump()

    def on_probe_result(self, worker_id: str, probe_id: str, fingerprint: str, error: str) -> None:
        entry = self._probes.pop(probe_id, None)
        worker = self._workers.get(worker_id)
        if entry is None or worker is None or entry[0] is not worker:
            return
        workspace = entry[1]
        view = worker.workspaces.get(workspace)
        if view is None or view.probe_id != probe_id:
            return
        if error:
            view.state, view.reason = Visibility.INVISIBLE, f"the worker cannot read the workspace: {error}"
        else:
            try:
                expected = self._fingerprint(workspace)
            except OSError as exc:
                view.state, view.reason = Visibility.INVISIBLE, f"the server cannot fingerprint the workspace: {exc}"
            else:
                if fingerprint == expected:
                    view.state, view.reason = Visibility.VISIBLE, ""
                else:
                    view.state = Visibility.INVISIBLE
                    view.reason = "the worker sees a different or stale copy of the workspace (fingerprint differs)"
        self._pump()

    # -- internals -----------------------------------------------------------------------------

    def _capable(self, worker: _Worker, call: QueryCall) -> bool:
        """Could this worker ever run the call (ignoring its free slots)?"""
        if worker.draining or call.tool_name not in worker.runnable:
            return False
        if call.required_labels:
            labels = worker.reg.labels
            if any(labels.get(k) != v for k, v in call.required_labels.items()):
                return False
        return self._view(worker, call.workspace).state is not Visibility.INVISIBLE

    def _view(self, worker: _Worker, workspace: str) -> WorkspaceView:
        view = worker.workspaces.get(workspace)
        if view is None:
            if not _under_roots(workspace, worker.reg.workspace_roots):
                roots = ", ".join(worker.reg.workspace_roots)
                view = WorkspaceView(Visibility.INVISIBLE, f"the workspace is outside the worker's roots ({roots})")
            else:
                probe_id = f"p{next(self._probe_ids)}"
                view = WorkspaceView(Visibility.PROBING, "probe sent", probe_id, time.monotonic())
                self._probes[probe_id] = (worker, workspace)
                worker.link.probe(probe_id, workspace)
            worker.workspaces[workspace] = view
        return view

    def _pick(self, call: QueryCall) -> _Worker | None:
        best: _Worker | None = None
        for worker in self._workers.values():
            if worker.free_slots <= 0 or not self._capable(worker, call):
                continue
            if worker.workspaces[call.workspace].state is not Visibility.VISIBLE:
                continue
            if best is None or worker.free_slots > best.free_slots:
                best = worker
        return best

    def _pump(self) -> None:
        """Hands free slots to pending calls, one call per session per round (round-robin)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            progress = True
            while progress and self._queues and any(w.free_slots > 0 for w in self._workers.values()):
                progress = False
                for session_id in list(self._queues):
                    queue = self._queues[session_id]
                    assigned = False
                    for pending in queue:
                        worker = self._pick(pending.call)
                        if worker is not None:
                            queue.remove(pending)
                            self._assign(worker, pending)
                            assigned = progress = True
                            break
                    if not queue:
                        del self._queues[session_id]
                    elif assigned:
                        self._queues.move_to_end(session_id)
        finally:
            self._pumping = False

    def _assign(self, worker: _Worker, pending: _Pending) -> None:
        call = pending.call
        pending.worker = worker
        pending.started = time.monotonic()
        pending.orphaned_since = None
        worker.in_flight[(call.call_id, pending.attempt)] = pending
        worker.max_in_flight_seen = max(worker.max_in_flight_seen, len(worker.in_flight))
        remaining = pending.enqueued + call.timeout - pending.started
        self._dirty.add(worker.link)
        if len(worker.in_flight) > 1:
            self._coalesce = True
        worker.link.assign(
            Assignment(
                call_id=call.call_id,
                attempt=pending.attempt,
                tool_name=call.tool_name,
                arguments_json=call.arguments_json,
                workspace=call.workspace,
                session_id=call.session_id,
                deadline=time.time() + max(remaining, 0.0),
                denied_paths=call.denied_paths,
            )
        )
        if call.on_event is not None:
            call.on_event(CallStarted(worker.reg.worker_id, pending.attempt))

    def _lose(self, worker: _Worker, reason: str) -> None:
        """Removes a worker; its calls are retried elsewhere or end with an error."""
        if self._workers.get(worker.reg.worker_id) is worker:
            del self._workers[worker.reg.worker_id]
        for probe_id in [p for p, (w, _) in self._probes.items() if w is worker]:
            del self._probes[probe_id]
        orphans = list(worker.in_flight.values())
        worker.in_flight.clear()
        for pending in orphans:
            if pending.future.done():
                continue
            call = pending.call
            self._emit(pending, WorkerLost(worker.reg.worker_id, reason, [call.call_id]))
            idempotent = call.idempotent and worker.tools[call.tool_name].idempotent
            if idempotent and pending.attempt < call.max_attempts:
                pending.attempt += 1
                pending.worker = None
                self._emit(
                    pending,
                    CallRetried(
                        call.call_id, pending.attempt, f"worker {worker.reg.worker_id} lost: {reason}",
                        worker.reg.worker_id,
                    ),
                )
                self._queues.setdefault(call.session_id, deque()).appendleft(pending)
                self._queues.move_to_end(call.session_id, last=False)
            else:
                why = f"tried {pending.attempt} times" if idempotent else "its tool is not idempotent: not retried"
                self._finish(
                    pending,
                    ToolResult.error(
                        ErrorKind.WORKER_LOST,
                        f"worker {worker.reg.worker_id} was lost while running {call.tool_name} ({reason}); {why}",
                        worker_id=worker.reg.worker_id,
                        attempt=pending.attempt,
                    ),
                )
        self._pump()

    def _withdraw(self, pending: _Pending, reason: str) -> None:
        """Takes a call back: out of its queue, or cancelled on its worker (whose slot stays
        taken until the worker answers, so credit stays exact)."""
        queue = self._queues.get(pending.call.session_id)
        if queue is not None and pending in queue:
            queue.remove(pending)
            if not queue:
                del self._queues[pending.call.session_id]
        elif pending.worker is not None:
            pending.worker.link.cancel(pending.call.call_id, pending.attempt, reason)
        if pending.deadline_timer:
            pending.deadline_timer.cancel()

    def _on_deadline(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        call = pending.call
        where = f"on worker {pending.worker.reg.worker_id}" if pending.worker else "waiting for a free worker"
        result = ToolResult.error(
            ErrorKind.TIMEOUT,
            f"{call.tool_name} timed out after {call.timeout:g}s {where}",
            worker_id=pending.worker.reg.worker_id if pending.worker else "",
            attempt=pending.attempt,
        )
        self._withdraw(pending, f"deadline of {call.timeout:g}s exceeded")
        self._finish(pending, result)

    def _finish(self, pending: _Pending, result: ToolResult) -> None:
        if pending.deadline_timer:
            pending.deadline_timer.cancel()
        if not pending.future.done():
            pending.future.set_result(result)

    def _emit(self, pending: _Pending, event: PoolEvent) -> None:
        if pending.call.on_event is not None:
            pending.call.on_event(event)

    def _no_worker_result(self, call: QueryCall) -> ToolResult:
        reasons = []
        for worker in self._workers.values():
            view = worker.workspaces.get(call.workspace)
            if call.tool_name in worker.tools and view is not None and view.state is Visibility.INVISIBLE:
                reasons.append(f"{worker.reg.worker_id}: {view.reason}")
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        return ToolResult.error(
            ErrorKind.NO_WORKER,
            f"no connected worker can run {call.tool_name} for workspace {call.workspace}{detail}",
        )

    async def _watch(self) -> None:
        """Finds silent workers, unanswered probes and calls left without any capable worker."""
        tick = min(self.heartbeat_interval, 0.25)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if now - worker.last_seen > self.heartbeat_timeout:
                    self._lose(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
                    worker.link.close("heartbeat timeout")
                    continue
                for workspace, view in worker.workspaces.items():
                    if view.state is Visibility.PROBING and now - view.probe_sent > self.probe_timeout:
                        self._probes.pop(view.probe_id, None)
                        view.state, view.reason = Visibility.INVISIBLE, f"no answer to the probe of {workspace}"
            for session_id in list(self._queues):
                for pending in list(self._queues.get(session_id, ())):
                    if any(self._capable(w, pending.call) for w in self._workers.values()):
                        pending.orphaned_since = None
                    elif pending.attempt == 1:
                        # Never ran anywhere (every probe said no): fail fast, the caller may
                        # run it itself.
                        self._withdraw(pending, "no capable worker")
                        self._finish(pending, self._no_worker_result(pending.call))
                    elif pending.orphaned_since is None:
                        pending.orphaned_since = now
                    elif now - pending.orphaned_since >= self.no_worker_wait:
                        # Its worker was lost: give a replacement a bounded time to connect.
                        self._withdraw(pending, "no capable worker")
                        result = self._no_worker_result(pending.call)
                        result.output += f" (waited {self.no_worker_wait:g}s for one to connect)"
                        result.attempt = pending.attempt
                        self._finish(pending, result)
            self._pump()
            await self.flush()

    def _snapshot(self, worker: _Worker) -> WorkerSnapshot:
        return WorkerSnapshot(
            worker_id=worker.reg.worker_id,
            version=worker.reg.version,
            hostname=worker.reg.hostname,
            peer=worker.reg.peer,
            labels=dict(worker.reg.labels),
            tools=sorted(worker.tools),
            slots=worker.reg.slots,
            in_flight=len(worker.in_flight),
            workspace_roots=list(worker.reg.workspace_roots),
            draining=worker.draining,
            connected_at=worker.connected_at,
            last_seen=time.time() - (time.monotonic() - worker.last_seen),
            workspaces={ws: (v.state is Visibility.VISIBLE, v.reason) for ws, v in sorted(worker.workspaces.items())},
            completed=worker.completed,
            max_in_flight_seen=worker.max_in_flight_seen,
        )
