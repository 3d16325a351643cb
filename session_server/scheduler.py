"""Order-preserving scheduling of the tool calls of one model response.

Every call sees the workspace exactly as if the calls ran one after another, in model order:
- a call waits for each earlier, unfinished call it conflicts with: one of the two may write what
  the other reads or writes (`ToolCall.effects`, declared by each tool; a tool that declares
  nothing, like bash, conflicts with everything). Query calls never conflict with each other;
- Execute calls run one at a time, in model order, whatever they touch;
- so `[write a, read a]` reads the new content, `[read a, write a]` the old, and in
  `[write a, read b]` the read need not wait for the write;
- Query calls run at most `query_concurrency` at once;
- a call without a lane (unknown tool, unparsable arguments) is never executed: it gets an
  `UNKNOWN_TOOL` error result at once and holds nobody back;
- one call's failure never touches its siblings; only cancellation does.

Calls can be fed while the model is still streaming (`add()` per call, then `close_input()`):
Query calls that conflict with no earlier call start as soon as they are added.

Each call runs in its own task whose dependencies are the tasks of the earlier calls it must
wait for. Nothing polls or sleeps, so scheduling costs microseconds per call.

The scheduler only orders calls: each `ToolCall` (session_server.calls) owns its state, timings
and events, and the executor decides where it runs.

Cancellation (`cancel()`, or cancelling the task awaiting `results()`) cancels every running
call, waits for those tasks to end, and gives each unfinished call a `CANCELLED` error result.
`results()` then *returns* the complete list rather than raising: the caller still has to commit
one result per call to history, in model order, and a raised `CancelledError` would lose them.
The cancellation is marked handled (`Task.uncancel()`); the caller checks `cancelled` and ends
the turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from session_server.calls import ToolCall
from tool_worker.tools.base import ErrorKind, Lane, ToolResult

log = logging.getLogger(__name__)

Executor = Callable[[ToolCall], Awaitable[ToolResult]]


class TurnScheduler:
    """Runs the tool calls of one model response of one session, in lanes, in model order.

    `executor(call)` runs one call (the server's dispatches Query calls to the worker pool and
    runs Execute calls locally) and must honour cancellation. Every call ends with exactly one
    `ToolCall.finish()`, executed or not.

    Use once per response: `add()` each call, `close_input()`, `await results()`; or
    `await run_all(calls)`. If you stop before awaiting `results()`, call `cancel()` and still
    await `results()` so no task outlives the turn.
    """

    def __init__(self, executor: Executor, *, query_concurrency: int) -> None:
        if query_concurrency < 1:
            raise ValueError(f"query_concurrency is {query_concurrency}: it must be at least 1")
        self._executor = executor
        self._query_slots = asyncio.Semaphore(query_concurrency)
        self._calls: list[ToolCall] = []
        self._tasks: list[asyncio.Task[None]] = []
        # The executed calls added so far, with their tasks: what a new call may have to wait for.
        self._scheduled: list[tuple[ToolCall, asyncio.Task[None]]] = []
        # Those of them not in the Query lane: all a Query call may have to wait for (two Query
        # calls never do), so a turn of many reads costs one look per Execute call, not per call.
        self._scheduled_writers: list[tuple[ToolCall, asyncio.Task[None]]] = []
        self._input_closed = asyncio.Event()
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """True once the turn was cancelled, by `cancel()` or by cancelling `results()`."""
        return self._cancelled

    def add(self, call: ToolCall) -> None:
        """Schedule the next call in model order. Must be called from the event loop."""
        if self._input_closed.is_set():
            reason = "the turn was cancelled" if self._cancelled else "close_input() was called"
            raise RuntimeError(f"cannot add call {call.call_id!r}: {reason}; add every call before closing input")
        self._calls.append(call)
        if call.lane is None:
            call.finish(call.rejection or ToolResult.error(
                ErrorKind.UNKNOWN_TOOL,
                f"Tool call {call.call_id} was not run: {call.tool_name!r} is not an available tool "
                "or its arguments are not valid JSON. Use one of the listed tools with JSON arguments.",
            ))
            return
        earlier_calls = self._scheduled_writers if call.lane is Lane.QUERY else self._scheduled
        deps = [task for earlier, task in earlier_calls if not task.done() and _must_follow(call, earlier)]
        task = asyncio.get_running_loop().create_task(self._run(call, deps), name=f"tool-call-{call.call_id}")
        self._tasks.append(task)
        self._scheduled.append((call, task))
        if call.lane is not Lane.QUERY:
            self._scheduled_writers.append((call, task))

    def close_input(self) -> None:
        """No more calls will be added: `results()` may return once the added ones finish."""
        self._input_closed.set()

    def cancel(self) -> None:
        """Cancel the turn: unfinished calls end with `CANCELLED` results. Closes input."""
        self._cancelled = True
        self._input_closed.set()
        for task in self._tasks:
            task.cancel()

    async def abandon(self) -> None:
        """Cancels the turn and waits until every call has ended, their results unused."""
        self.cancel()
        await self.results()

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
            for call in self._calls:
                if call.result is None:
                    call.finish(call.cancelled_result())
        return [_result_of(call) for call in self._calls]

    async def run_all(self, calls: Iterable[ToolCall]) -> list[ToolResult]:
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

    async def _run(self, call: ToolCall, deps: list[asyncio.Task[None]]) -> None:
        try:
            if deps:
                await asyncio.wait(deps)
            if call.lane is Lane.QUERY:
                async with self._query_slots:
                    result = await self._execute(call)
            else:
                result = await self._execute(call)
        except asyncio.CancelledError:
            call.finish(call.cancelled_result())
            raise
        call.finish(result)

    async def _execute(self, call: ToolCall) -> ToolResult:
        call.begin()
        try:
            return await self._executor(call)
        except Exception as exc:
            log.exception("tool call %s (%s) raised", call.call_id, call.tool_name)
            return ToolResult.error(
                ErrorKind.INTERNAL,
                f"Tool call {call.call_id} ({call.tool_name}) failed with an internal error: "
                f"{type(exc).__name__}: {exc}. The other calls of this turn were not affected; "
                "retry the call, and report the error if it persists.",
            )


def _must_follow(call: ToolCall, earlier: ToolCall) -> bool:
    if call.lane is Lane.QUERY and earlier.lane is Lane.QUERY:
        return False  # read-only both: they never disturb each other
    if call.lane is Lane.EXECUTE and earlier.lane is Lane.EXECUTE:
        return True  # the Execute lane runs one call at a time, in model order
    return call.touches().conflicts_with(earlier.touches())


def _result_of(call: ToolCall) -> ToolResult:
    if call.result is None:
        raise AssertionError(f"call {call.call_id} ended without a result")
    return call.result
