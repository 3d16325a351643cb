"""External tasks: tool calls that clients claim, run in their own environment, and complete.

Domain logic, no grpc. A call of a lane in EXTERNAL mode is offered here (`run`), and its turn
waits until one of these ends it:
- a client that holds the task's lease completes it (`complete`): its result is the call's;
- the task's overall deadline passes: a TIMEOUT result;
- the turn is cancelled (or the session deleted): the task is withdrawn, the call is CANCELLED.
Each end emits one ExternalTaskCompleted event (client_id empty unless a client completed it).

A claim (`claim`) leases a task to one client for `lease` seconds. A lease that expires before
the task is completed re-offers the task with the next attempt number (and a new
ExternalTaskPending event); the former holder can no longer complete it. The holder may extend
its lease (`renew`) while it works, for as long as the task's overall deadline allows.

Time: `clock` stamps leases and deadlines (epoch seconds), and `timers` ends them: its
`call_later` runs the lease expiries, the overall deadlines and the end of a claim's long-poll.
Both default to real time (the running event loop's timers); tests give a fake pair and move
time on by hand.

Structures: every live task is in `_tasks` (by task id) and in `_by_session` (by session, in
offer order, which is the order claims hand tasks out). Long-polling claims wait on futures in
`_waiters`. `run` removes its task in a `finally`, so no task outlives the call awaiting it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from session_server.admission import ShuttingDown
from session_server.events import (
    CallInfo,
    EventPayload,
    ExternalTaskCompleted,
    ExternalTaskInfo,
    ExternalTaskPending,
)
from tool_worker.tools.base import ErrorKind, ToolResult

if TYPE_CHECKING:
    from session_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_EXTERNAL_TASK_TIMEOUT = 600.0
DEFAULT_LEASE = 30.0
MIN_LEASE = 0.01
MAX_LEASE = 3600.0
# A claim's long-poll is bounded so that proxies and load balancers never see an idle call.
MAX_CLAIM_WAIT = 60.0
MAX_CLAIM_TASKS = 100


def _stopping() -> ShuttingDown:
    return ShuttingDown("the server is shutting down and offers no more tasks: claim again on another server, "
                        "or on this one once it restarts")


class TaskNotFound(LookupError):
    def __init__(self, session_id: str, task_id: str) -> None:
        super().__init__(
            f"no external task {task_id!r} in session {session_id}: it never existed, was completed, timed out, "
            "or its turn was cancelled"
        )
        self.session_id = session_id
        self.task_id = task_id


class LeaseNotHeld(Exception):
    """The client completing a task does not hold its lease (never claimed, expired, or another's)."""

    def __init__(self, task_id: str, client_id: str, why: str) -> None:
        super().__init__(f"client {client_id!r} does not hold the lease of task {task_id}: {why}")
        self.task_id = task_id
        self.client_id = client_id


# What a withdrawn task's result says, after its tool's name.
WITHDRAWN_WITH_TURN = "was cancelled with its turn (CancelTurn, or the session was deleted)"
WITHDRAWN_AT_STOP = (
    "was withdrawn: the session server stopped before the task was completed, and it can no longer be completed"
)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """What runs a callback after a delay (seconds); asyncio's event loop is one."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> Cancellable: ...


class ClaimObserver(Protocol):
    """Who owns the call hears when a client starts running it (see session_server.calls)."""

    def running(self, worker_id: str, attempt: int = 1) -> None: ...


@dataclass
class _Task:
    info: ExternalTaskInfo
    emit: Callable[[EventPayload], None]
    observer: ClaimObserver
    future: asyncio.Future[ToolResult]
    client_id: str | None = None
    lease_timer: Cancellable | None = None


class ExternalTasks:
    """Every external task of the server, by session. `clock` gives epoch seconds; `timers`
    (default: the running event loop) runs what happens when a lease, deadline or wait ends."""

    def __init__(self, clock: Callable[[], float] = time.time, timers: Timers | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self._clock = clock
        self._timers = timers
        self._metrics = metrics
        self._tasks: dict[str, _Task] = {}
        self._by_session: dict[str, dict[str, _Task]] = {}
        # Long-polling claims, by session: woken with False when a task becomes claimable, True when
        # the session is closed, ShuttingDown when the server stops.
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}
        self._stopped = False
        # Why the tasks of a cancelled call are withdrawn, as their results say it.
        self._withdrawn_why = WITHDRAWN_WITH_TURN

    def __len__(self) -> int:
        return len(self._tasks)

    def counts(self) -> dict[str, int]:
        """Live tasks by state: unclaimed, claimed."""
        claimed = sum(1 for task in self._tasks.values() if task.client_id is not None)
        return {"unclaimed": len(self._tasks) - claimed, "claimed": claimed}

    def pending(self, session_id: str) -> list[ExternalTaskInfo]:
        """The live tasks of a session (claimed or not), in offer order."""
        return [task.info for task in self._by_session.get(session_id, {}).values()]

    async def run(
        self,
        session_id: str,
        call: CallInfo,
        workspace: str,
        lifetime: float,
        emit: Callable[[EventPayload], None],
        observer: ClaimObserver,
        trace_context: tuple[str, str] = ("", ""),
    ) -> ToolResult:
        """Offers `call` as a task and returns its result; `lifetime` seconds is its overall
        deadline. `observer.running()` hears each claim. `trace_context` (W3C traceparent,
        tracestate) travels with the task, for the client to continue the call's trace."""
        info = self._new_info(session_id, call, workspace, lifetime)
        info = replace(info, traceparent=trace_context[0], tracestate=trace_context[1])
        task = _Task(info, emit, observer, asyncio.get_running_loop().create_future())
        self._tasks[info.task_id] = task
        self._by_session.setdefault(session_id, {})[info.task_id] = task
        deadline = self._call_later(lifetime, self._time_out, task, lifetime)
        try:
            emit(ExternalTaskPending(info))
            self._wake(session_id)
            try:
                await asyncio.wait({task.future})
            except asyncio.CancelledError:
                if not task.future.done():
                    raise
                # Its client completed it before the cancel reached this call (CompleteExternalTask
                # and CancelTurn in one loop turn): the client was told its result was taken, and
                # the command ran, so the model hears what it did, not that it was cancelled.
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            return task.future.result()
        finally:
            deadline.cancel()
            if info.task_id in self._tasks:
                self._end(task, replace(self._withdrawn(call), attempt=task.info.attempt), "")

    async def mirror(
        self,
        session_id: str,
        call: CallInfo,
        workspace: str,
        lifetime: float,
        emit: Callable[[EventPayload], None],
        run: Callable[[], Awaitable[ToolResult]],
    ) -> ToolResult:
        """HYBRID mode: `run()` does the call here, announced by ExternalTaskPending and
        ExternalTaskCompleted events (client_id: the worker that ran it). Nobody can claim it."""
        info = self._new_info(session_id, call, workspace, lifetime)
        emit(ExternalTaskPending(info))
        try:
            result = await run()
        except asyncio.CancelledError:
            emit(ExternalTaskCompleted(info.task_id, call.call_id, self._withdrawn(call), ""))
            raise
        emit(ExternalTaskCompleted(info.task_id, call.call_id, result, result.worker_id))
        return result

    async def claim(
        self, session_id: str, client_id: str, max_tasks: int, lease: float, wait: float
    ) -> list[ExternalTaskInfo]:
        """Leases up to `max_tasks` unclaimed tasks of a session to `client_id`, oldest first.

        When none is unclaimed, waits up to `wait` seconds for one; returns [] if none comes.
        Raises admission.ShuttingDown instead of waiting while the server stops.
        """
        loop = asyncio.get_running_loop()
        gave_up = False
        waiter: asyncio.Future[bool] | None = None

        def give_up() -> None:
            nonlocal gave_up
            gave_up = True
            if waiter is not None and not waiter.done():
                waiter.set_result(False)

        timer = self._call_later(wait, give_up) if wait > 0 else None
        try:
            while True:
                free = [t for t in self._by_session.get(session_id, {}).values() if t.client_id is None]
                if free:
                    return [self._lease(task, client_id, lease) for task in free[:max_tasks]]
                if gave_up or timer is None:
                    return []
                if self._stopped:
                    raise _stopping()
                waiter = loop.create_future()
                waiters = self._waiters.setdefault(session_id, set())
                waiters.add(waiter)
                try:
                    await waiter
                finally:
                    waiters.discard(waiter)
                    if not waiters and self._waiters.get(session_id) is waiters:
                        del self._waiters[session_id]
                if waiter.result():
                    return []  # the session was closed
        finally:
            if timer is not None:
                timer.cancel()

    def complete(self, session_id: str, task_id: str, client_id: str, result: ToolResult) -> None:
        """Ends a task with a client's result. Raises TaskNotFound or LeaseNotHeld."""
        task = self._held(session_id, task_id, client_id)
        # The client cannot know how long the call queued here (the call's owner does); run_time
        # is the client's own measure.
        result = replace(result, worker_id=result.worker_id or client_id, attempt=task.info.attempt, queue_wait=0.0)
        self._end(task, result, client_id)

    def renew(self, session_id: str, task_id: str, client_id: str, lease: float) -> ExternalTaskInfo:
        """Extends a held lease to `lease` seconds from now. Raises TaskNotFound or LeaseNotHeld."""
        task = self._held(session_id, task_id, client_id)
        self._arm_lease(task, lease)
        return task.info

    def close_session(self, session_id: str) -> None:
        """Withdraws whatever a session still has (its turn should have done so) and ends its claims."""
        for task in list(self._by_session.get(session_id, {}).values()):
            self._remove(task)
            task.future.cancel()
        for waiter in self._waiters.get(session_id, set()):
            if not waiter.done():
                waiter.set_result(True)

    def interrupting(self) -> None:
        """The stopping server now cancels the turns its grace left running: their tasks are
        withdrawn saying that the server stopped, not that someone cancelled the turn."""
        self._withdrawn_why = WITHDRAWN_AT_STOP

    def stop(self) -> None:
        """The server is stopping and offers no more tasks: the claims that wait end now, and so
        do those that would wait from now on (their calls end with a status saying so rather
        than being cut when the gRPC server stops)."""
        self._stopped = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(_stopping())

    # -- internals -----------------------------------------------------------------------------

    def _withdrawn(self, call: CallInfo) -> ToolResult:
        return ToolResult.error(ErrorKind.CANCELLED, f"{call.tool_name} {self._withdrawn_why}")

    def _new_info(self, session_id: str, call: CallInfo, workspace: str, lifetime: float) -> ExternalTaskInfo:
        return ExternalTaskInfo(
            task_id=f"task_{uuid.uuid4().hex[:16]}",
            session_id=session_id,
            call=call,
            lane=call.lane,
            attempt=1,
            lease_expire_time=None,
            deadline=self._clock() + lifetime,
            workspace=workspace,
        )

    def _held(self, session_id: str, task_id: str, client_id: str) -> _Task:
        """The task, if `client_id` holds its lease now; else TaskNotFound or LeaseNotHeld."""
        task = self._tasks.get(task_id)
        if task is None or task.info.session_id != session_id:
            raise TaskNotFound(session_id, task_id)
        if task.client_id is None:
            raise LeaseNotHeld(task_id, client_id, "the task is not claimed (or its lease expired): claim it first")
        if task.client_id != client_id:
            raise LeaseNotHeld(task_id, client_id, "another client holds it")
        # Held until the lease's timer ends it (`_expire`), on the event loop's monotonic clock.
        # Not compared with lease_expire_time, which is wall-clock time for clients: a wall clock
        # stepped forward (NTP, a VM resumed) refused the holder while nobody else could claim.
        return task

    def _lease(self, task: _Task, client_id: str, lease: float) -> ExternalTaskInfo:
        task.client_id = client_id
        self._arm_lease(task, lease)
        try:
            task.observer.running(client_id, task.info.attempt)
        except Exception:
            log.exception("external task %s: reporting its claim failed", task.info.task_id)
        return task.info

    def _arm_lease(self, task: _Task, lease: float) -> None:
        """The held lease now ends `lease` seconds from now (the timer of the old end is dropped)."""
        if task.lease_timer is not None:
            task.lease_timer.cancel()
        task.info = replace(task.info, lease_expire_time=self._clock() + lease)
        task.lease_timer = self._call_later(lease, self._expire, task, task.info.attempt)

    def _call_later(self, delay: float, callback: Callable[..., object], *args: object) -> Cancellable:
        timers = self._timers if self._timers is not None else asyncio.get_running_loop()
        return timers.call_later(delay, callback, *args)

    def _time_out(self, task: _Task, lifetime: float) -> None:
        if self._tasks.get(task.info.task_id) is not task:
            return
        call, attempt = task.info.call, task.info.attempt
        # What to look at depends on where the task was: "check that a client claims" sent the
        # reader after claims when a client held the task and its handler ran past the deadline.
        if task.client_id is not None:
            what = (f"client {task.client_id!r} claimed it (attempt {attempt}) but did not complete it within "
                    f"{lifetime:g}s; make its handler finish sooner")
        elif attempt > 1:
            what = (f"none completed it within {lifetime:g}s: its lease expired {attempt - 1} time(s) and nobody "
                    "claimed it again; check that the clients complete or renew what they claim "
                    "(RenewExternalTaskLease)")
        else:
            what = (f"none completed it within {lifetime:g}s (nobody claimed it); check that a client claims this "
                    "session's tasks (ClaimExternalTasks)")
        self._end(task, ToolResult.error(
            ErrorKind.TIMEOUT,
            f"{call.tool_name} was offered to clients as an external task, but {what}, "
            "or raise config.queue.external_task_timeout",
            attempt=attempt,
        ), "")

    def _expire(self, task: _Task, attempt: int) -> None:
        if self._tasks.get(task.info.task_id) is not task or task.info.attempt != attempt:
            return
        task.client_id = None
        task.lease_timer = None
        task.info = replace(task.info, attempt=attempt + 1, lease_expire_time=None)
        if self._metrics is not None:
            self._metrics.external_task_lease_expirations.inc()
        self._emit(task, ExternalTaskPending(task.info))
        self._wake(task.info.session_id)

    def _end(self, task: _Task, result: ToolResult, client_id: str) -> None:
        self._remove(task)
        if self._metrics is not None:
            outcome = "completed" if client_id else "timeout" if result.error_kind is ErrorKind.TIMEOUT else "cancelled"
            self._metrics.external_tasks_ended.labels(outcome).inc()
        self._emit(task, ExternalTaskCompleted(task.info.task_id, task.info.call.call_id, result, client_id))
        if not task.future.done():
            task.future.set_result(result)

    def _remove(self, task: _Task) -> None:
        task_id, session_id = task.info.task_id, task.info.session_id
        self._tasks.pop(task_id, None)
        tasks = self._by_session.get(session_id)
        if tasks is not None:
            tasks.pop(task_id, None)
            if not tasks:
                del self._by_session[session_id]
        if task.lease_timer is not None:
            task.lease_timer.cancel()
            task.lease_timer = None

    def _wake(self, session_id: str) -> None:
        for waiter in self._waiters.get(session_id, set()):
            if not waiter.done():
                waiter.set_result(False)

    @staticmethod
    def _emit(task: _Task, payload: EventPayload) -> None:
        try:
            task.emit(payload)
        except Exception:
            # A broken event sink must not strand the task: its call still gets its result.
            log.exception("external task %s: emitting %s failed", task.info.task_id, type(payload).__name__)


