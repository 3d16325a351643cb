"""Order-preserving scheduling of the tool calls of one model response.

Walking the calls in model order:
- a maximal run of consecutive Query calls runs together, at most `query_concurrency` at once;
- an Execute call waits until every earlier call has finished, then runs alone, and every later
  call waits for it; so `[write a, read a]` reads the new content;
- a call without a lane (unknown tool, unparsable arguments) is never executed: it gets an
  `UNKNOWN_TOOL` error result at once and holds nobody back;
- one call's failure never touches its siblings; only cancellation does.

Calls can be fed while the model is still streaming (`add()` per call, then `close_input()`):
Query calls ahead of the first Execute call start as soon as they are added.

Each call runs in its own task whose dependencies are the tasks it must wait for: the latest
Execute call for a Query call, every earlier call for an Execute call. Nothing polls or sleeps,
so scheduling costs microseconds per call.

Cancellation (`cancel()`, or cancelling the task awaiting `results()`) cancels every running
call, waits for those tasks to end, and gives each unfinished call a `CANCELLED` error result.
`results()` then *returns* the complete list rather than raising: the caller still has to commit
one result per call to history, in model order, and a raised `CancelledError` would lose them.
The cancellation is marked handled (`Task.uncancel()`); the caller checks `cancelled` and ends
the turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from session_server.stats import LaneStats
from tool_worker.tools.base import ErrorKind, Lane, ToolResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledCall:
    """One tool call of a model response. `index` is its position in the response, from 0.

    The scheduler orders by the sequence of `add()`; `index` is carried along for events.
    """

    index: int
    call_id: str
    tool_name: str
    arguments_json: str
    # None: the tool is unknown or the arguments did not parse; the call is never executed.
    lane: Lane | None
    # Why a lane-less call was refused, as the model will read it; a generic text when None.
    rejection: ToolResult | None = None


Executor = Callable[[ScheduledCall], Awaitable[ToolResult]]
OnStart = Callable[[ScheduledCall], None]
OnFinish = Callable[[ScheduledCall, ToolResult], None]


@dataclass
class _Slot:
    call: ScheduledCall
    added: float
    started: float | None = None
    result: ToolResult | None = None
    # What the executor said the started call waits for before it runs (see `waiting()`).
    waiting_for: str | None = None


class TurnScheduler:
    """Runs the tool calls of one model response of one session, in lanes, in model order.

    `executor(call)` runs one call (the server's dispatches Query calls to the worker pool and
    runs Execute calls locally) and must honour cancellation. `on_start(call)` fires when a call
    starts executing; `on_finish(call, result)` fires exactly once for every call, executed or
    not, in completion order. Both are synchronous and must not block.

    Use once per response: `add()` each call, `close_input()`, `await results()`; or
    `await run_all(calls)`. If you stop before awaiting `results()`, call `cancel()` and still
    await `results()` so no task outlives the turn.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        query_concurrency: int,
        stats: LaneStats | None = None,
        on_start: OnStart | None = None,
        on_finish: OnFinish | None = None,
    ) -> None:
        if query_concurrency < 1:
            raise ValueError(f"query_concurrency is {query_concurrency}: it must be at least 1")
        self._executor = executor
        self._query_slots = asyncio.Semaphore(query_concurrency)
        self._stats = stats
        self._on_start = on_start
        self._on_finish = on_finish
        self._slots: list[_Slot] = []
        # By identity: a ScheduledCall carrying a rejection is not hashable.
        self._slot_of: dict[int, _Slot] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # The latest Execute call, and the Query calls added after it: what the next call waits for.
        self._last_execute: asyncio.Task[None] | None = None
        self._since_execute: list[asyncio.Task[None]] = []
        self._input_closed = asyncio.Event()
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """True once the turn was cancelled, by `cancel()` or by cancelling `results()`."""
        return self._cancelled

    def add(self, call: ScheduledCall) -> None:
        """Schedule the next call in model order. Must be called from the event loop."""
        if self._input_closed.is_set():
            reason = "the turn was cancelled" if self._cancelled else "close_input() was called"
            raise RuntimeError(f"cannot add call {call.call_id!r}: {reason}; add every call before closing input")
        slot = _Slot(call, time.perf_counter())
        self._slots.append(slot)
        self._slot_of[id(call)] = slot
        if call.lane is None:
            self._finish(
                slot,
                call.rejection
                or ToolResult.error(
                    ErrorKind.UNKNOWN_TOOL,
                    f"Tool call {call.call_id} was not run: {call.tool_name!r} is not an available tool "
                    "or its arguments are not valid JSON. Use one of the listed tools with JSON arguments.",
                ),
            )
            return
        if self._stats is not None:
            self._stats.enqueued(call.lane)
        if call.lane is Lane.QUERY:
            deps = [self._last_execute] if self._last_execute is not None else []
        else:
            deps = [*self._since_execute, *([self._last_execute] if self._last_execute is not None else [])]
        pending = [t for t in deps if not t.done()]
        task = asyncio.get_running_loop().create_task(self._run(slot, pending), name=f"tool-call-{call.call_id}")
        self._tasks.append(task)
        if call.lane is Lane.QUERY:
            self._since_execute.append(task)
        else:
            self._last_execute = task
            self._since_execute = []

    def waiting(self, call: ScheduledCall, what: str | None) -> None:
        """For the executor: `call` waits for `what` (e.g. "its confirmation") and has not begun
        to run, or, with None, runs now. A cancellation's result says which."""
        self._slot_of[id(call)].waiting_for = what

    def close_input(self) -> None:
        """No more calls will be added: `results()` may return once the added ones finish."""
        self._input_closed.set()

    def cancel(self) -> None:
        """Cancel the turn: unfinished calls end with `CANCELLED` results. Closes input."""
        self._cancelled = True
        self._input_closed.set()
        for task in self._tasks:
            task.cancel()

    async def results(self) -> list[ToolResult]:
        """One result per call, in model order, once input is closed and every call has ended.

        Never raises `CancelledError`: see the module docstring.
        """
        try:
            await self._input_closed.wait()
            if self._tasks:
                await asyncio.wait(self._tasks)
        except asyncio.CancelledError:
            self.cancel()
            await self._drain()
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        if self._cancelled:
            # Tasks cancelled before their first step never ran their own bookkeeping.
            now = time.perf_counter()
            for slot in self._slots:
                if slot.result is None:
                    self._finish(slot, _cancelled_result(slot, now))
        return [_result_of(slot) for slot in self._slots]

    async def run_all(self, calls: Iterable[ScheduledCall]) -> list[ToolResult]:
        """Schedule `calls` (in model order) and return their results, in the same order."""
        for call in calls:
            self.add(call)
        self.close_input()
        return await self.results()

    async def _drain(self) -> None:
        # Cancelled tasks must be awaited so none outlives the turn, even if we are cancelled again.
        while True:
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                return
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                continue

    async def _run(self, slot: _Slot, deps: list[asyncio.Task[None]]) -> None:
        try:
            if deps:
                await asyncio.wait(deps)
            if slot.call.lane is Lane.QUERY:
                async with self._query_slots:
                    result = await self._execute(slot)
            else:
                result = await self._execute(slot)
        except asyncio.CancelledError:
            self._finish(slot, _cancelled_result(slot, time.perf_counter()))
            raise
        self._finish(slot, result)

    async def _execute(self, slot: _Slot) -> ToolResult:
        call = slot.call
        slot.started = time.perf_counter()
        if self._stats is not None and call.lane is not None:
            self._stats.started(call.lane)
        self._notify(self._on_start, call)
        try:
            result = await self._executor(call)
        except Exception as exc:
            log.exception("tool call %s (%s) raised", call.call_id, call.tool_name)
            result = ToolResult.error(
                ErrorKind.INTERNAL,
                f"Tool call {call.call_id} ({call.tool_name}) failed with an internal error: "
                f"{type(exc).__name__}: {exc}. The other calls of this turn were not affected; "
                "retry the call, and report the error if it persists.",
            )
        ended = time.perf_counter()
        updates: dict[str, float] = {}
        if not result.queue_wait:
            updates["queue_wait"] = slot.started - slot.added
        if not result.run_time:
            updates["run_time"] = ended - slot.started
        # A copy, so an executor returning a shared result object is never mutated.
        return dataclasses.replace(result, **updates) if updates else result

    def _finish(self, slot: _Slot, result: ToolResult) -> None:
        if slot.result is not None:
            return
        slot.result = result
        lane = slot.call.lane
        if self._stats is not None and lane is not None:
            if slot.started is None:
                self._stats.withdrawn(lane)
            else:
                self._stats.finished(lane, not result.is_error, result.queue_wait + result.run_time)
        self._notify(self._on_finish, slot.call, result)

    @staticmethod
    def _notify(callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            # An event sink's bug must not lose a call's result or stall the turn.
            log.exception("tool call event callback %r failed", callback)


def _cancelled_result(slot: _Slot, now: float) -> ToolResult:
    if slot.started is not None and slot.waiting_for is not None:
        return ToolResult.error(
            ErrorKind.CANCELLED,
            f"Tool call {slot.call.call_id} ({slot.call.tool_name}) was cancelled while waiting for "
            f"{slot.waiting_for}; it did not run.",
            queue_wait=now - slot.added,
        )
    if slot.started is None:
        return ToolResult.error(
            ErrorKind.CANCELLED,
            f"Tool call {slot.call.call_id} ({slot.call.tool_name}) was cancelled before it started.",
            queue_wait=now - slot.added,
        )
    return ToolResult.error(
        ErrorKind.CANCELLED,
        f"Tool call {slot.call.call_id} ({slot.call.tool_name}) was cancelled while running; "
        "its effects may be partial.",
        queue_wait=slot.started - slot.added,
        run_time=now - slot.started,
    )


def _result_of(slot: _Slot) -> ToolResult:
    if slot.result is None:
        raise AssertionError(f"call {slot.call.call_id} ended without a result")
    return slot.result
