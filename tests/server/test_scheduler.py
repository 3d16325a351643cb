"""TurnScheduler and ToolCall with fake executors: ordering, bounds, failures, cancellation,
streaming, and each call's events and timings. No test waits on time: `settle()` lets every
runnable task run until the loop has nothing left to do, and timings come from a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from session_server.calls import CallState, ToolCall
from session_server.events import CallInfo, CallRetried, ToolCallFinished, ToolCallStarted, WorkerLost
from session_server.scheduler import TurnScheduler
from session_server.stats import LaneStats, StatsLane
from tool_worker.effects import Effects, ReadScope, WritePath
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

Q, E = Lane.QUERY, Lane.EXECUTE
WAIT = 5.0  # bound on anything that happens at once: a hang fails the test instead of blocking it


async def settle() -> None:
    """Runs the event loop until every task that can make progress has (a bounded number of
    turns, no wall-clock time): what has not happened by then is waiting on something."""
    for _ in range(50):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_call(index: int, lane: Lane | None, *, tool: str | None = None, sink=None, stats=None, clock=None,
              arguments_json: str = "{}") -> ToolCall:
    name = tool or f"tool{index}"
    spec = ToolSpec(name, "", {"type": "object"}, lane, lane is Q) if lane is not None else None
    rejection = None if lane is not None else ToolResult.error(ErrorKind.UNKNOWN_TOOL, f"unknown tool {name!r}")
    return ToolCall(
        CallInfo(f"c{index}", name, arguments_json, lane.value if lane else "", index),
        sink if sink is not None else (lambda event: None),
        spec=spec,
        rejection=rejection,
        stats=stats,
        **({"clock": clock} if clock is not None else {}),
    )


def calls(*lanes: Lane | None, **kwargs) -> list[ToolCall]:
    return [make_call(i, lane, **kwargs) for i, lane in enumerate(lanes)]


class Recorder:
    """An executor that logs start/end, optionally blocks each call on a gate, and tracks concurrency."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.running = 0
        self.max_running = 0
        self.cancelled: list[str] = []

    def gate(self, call_id: str) -> asyncio.Event:
        return self.gates.setdefault(call_id, asyncio.Event())

    def started_event(self, call_id: str) -> asyncio.Event:
        return self.started.setdefault(call_id, asyncio.Event())

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.log.append(("start", call.call_id))
        call.running("local")
        self.started_event(call.call_id).set()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if call.call_id in self.gates:
                await self.gates[call.call_id].wait()
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.append(call.call_id)
            raise
        finally:
            self.running -= 1
        self.log.append(("end", call.call_id))
        return ToolResult(output=f"out {call.call_id}")

    def pos(self, event: str, call_id: str) -> int:
        return self.log.index((event, call_id))


def other_tasks() -> set[asyncio.Task]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_query_run_together_execute_alone_in_order() -> None:
    rec = Recorder()
    for cid in ("c0", "c1", "c2", "c3"):
        rec.gate(cid)
    sched = TurnScheduler(rec, query_concurrency=8)
    run = asyncio.create_task(sched.run_all(calls(Q, Q, E, Q)))

    await settle()
    assert rec.log == [("start", "c0"), ("start", "c1")]  # the execute call and the query after it wait
    rec.gate("c1").set()
    await settle()
    assert ("start", "c2") not in rec.log  # c0 still running
    rec.gate("c0").set()
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    await settle()
    assert ("start", "c3") not in rec.log  # waits for the execute call
    rec.gate("c2").set()
    await asyncio.wait_for(rec.started_event("c3").wait(), WAIT)
    rec.gate("c3").set()

    results = await asyncio.wait_for(run, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2", "out c3"]
    assert rec.pos("end", "c0") < rec.pos("start", "c2") and rec.pos("end", "c1") < rec.pos("start", "c2")
    assert rec.pos("end", "c2") < rec.pos("start", "c3")
    assert rec.max_running == 2


async def test_query_effects_are_worked_out_only_against_an_execute_call() -> None:
    """A Query call's effects, given as a function, are worked out only when an Execute call is
    compared with it: never in a turn of Query calls alone, and then ordering still holds."""
    worked_out: list[str] = []

    def lazily(call_id: str, path: str):
        def effects() -> Effects:
            worked_out.append(call_id)
            return Effects(reads=(ReadScope(path),), writes=())
        return effects

    rec = Recorder()
    queries = calls(Q, Q, Q)
    for call, path in zip(queries, ("a", "b", "c"), strict=True):
        call.effects = lazily(call.call_id, path)
    await asyncio.wait_for(TurnScheduler(rec, query_concurrency=8).run_all(queries), WAIT)
    assert worked_out == []

    rec = Recorder()
    rec.gate("c0")
    rec.gate("c1")
    turn = calls(Q, Q, E)
    turn[0].effects = lazily("c0", "a")
    turn[1].effects = lazily("c1", "b")
    turn[2].effects = Effects(reads=(), writes=(WritePath("a", file=True),))
    run = asyncio.create_task(TurnScheduler(rec, query_concurrency=8).run_all(turn))
    await settle()
    assert sorted(worked_out) == ["c0", "c1"]
    assert ("start", "c2") not in rec.log  # the write of a waits for the read of a
    rec.gate("c0").set()
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    assert ("end", "c1") not in rec.log  # and not for the read of b
    rec.gate("c1").set()
    await asyncio.wait_for(run, WAIT)
    assert worked_out.count("c0") == 1  # worked out once, however often compared


async def test_read_after_write_sees_new_content(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    write_may_finish = asyncio.Event()

    async def files(call: ToolCall) -> ToolResult:
        if call.tool_name == "write":
            # A slow write: a read that did not wait for it would see the old content.
            if call.call_id == "c1":
                await write_may_finish.wait()
            target.write_text(call.info.arguments_json)
            return ToolResult(output="wrote")
        return ToolResult(output=target.read_text())

    turn = [
        make_call(0, Q, tool="read"),
        make_call(1, E, tool="write", arguments_json="new"),
        make_call(2, Q, tool="read"),
        make_call(3, E, tool="write", arguments_json="newer"),
        make_call(4, Q, tool="read"),
    ]
    run = asyncio.create_task(TurnScheduler(files, query_concurrency=4).run_all(turn))
    await settle()
    write_may_finish.set()
    results = await asyncio.wait_for(run, WAIT)
    assert [r.output for r in results] == ["old", "wrote", "new", "wrote", "newer"]
    assert target.read_text() == "newer"


async def test_results_in_model_order_whatever_completion_order() -> None:
    rec = Recorder()
    finished: list[str] = []
    done = {f"c{i}": asyncio.Event() for i in range(5)}

    def sink(event) -> None:
        if isinstance(event, ToolCallFinished):
            finished.append(event.call_id)
            done[event.call_id].set()

    for cid in done:
        rec.gate(cid)
    run = asyncio.create_task(TurnScheduler(rec, query_concurrency=8).run_all(calls(Q, Q, Q, Q, Q, sink=sink)))
    for cid in reversed(done):
        rec.gate(cid).set()
        await asyncio.wait_for(done[cid].wait(), WAIT)

    results = await asyncio.wait_for(run, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2", "out c3", "out c4"]
    assert finished == ["c4", "c3", "c2", "c1", "c0"]  # events come in completion order


async def test_a_call_cancelled_while_it_waits_says_it_did_not_run() -> None:
    # The executor may say a call waits (for a confirmation) before it runs: its cancellation
    # then says so, not "while running; its effects may be partial".
    asking = asyncio.Event()
    clock = Clock()

    async def confirm_then_run(call: ToolCall) -> ToolResult:
        call.wait_for("its confirmation")
        asking.set()
        await asyncio.Event().wait()  # nobody answers
        raise AssertionError("unreachable")

    sched = TurnScheduler(confirm_then_run, query_concurrency=2)
    run = asyncio.create_task(sched.run_all(calls(E, clock=clock)))
    await asyncio.wait_for(asking.wait(), WAIT)
    clock.now += 3
    sched.cancel()
    [result] = await asyncio.wait_for(run, WAIT)
    assert result.error_kind is ErrorKind.CANCELLED
    assert "while waiting for its confirmation; it did not run" in result.output
    assert (result.queue_wait, result.run_time) == (3.0, 0.0)


async def test_query_concurrency_bound() -> None:
    rec = Recorder()
    results = await TurnScheduler(rec, query_concurrency=3).run_all(calls(*[Q] * 10))
    assert len(results) == 10 and not any(r.is_error for r in results)
    assert rec.max_running == 3


async def test_failures_leave_siblings_alone() -> None:
    async def flaky(call: ToolCall) -> ToolResult:
        await asyncio.sleep(0)
        if call.call_id == "c1":
            raise RuntimeError("disk on fire")
        if call.call_id == "c2":
            return ToolResult.error(ErrorKind.TOOL_ERROR, "no such file")
        return ToolResult(output=f"ok {call.call_id}")

    results = await TurnScheduler(flaky, query_concurrency=4).run_all(calls(Q, Q, Q, E, Q))
    assert results[1].is_error and results[1].error_kind is ErrorKind.INTERNAL
    assert "disk on fire" in results[1].output and "RuntimeError" in results[1].output
    assert results[2].error_kind is ErrorKind.TOOL_ERROR and results[2].output == "no such file"
    assert [r.output for r in (results[0], results[3], results[4])] == ["ok c0", "ok c3", "ok c4"]


async def test_cancel_mid_batch_gives_every_call_a_result() -> None:
    rec = Recorder()
    rec.gate("c1")
    rec.gate("c2")
    finished: list[str] = []

    def sink(event) -> None:
        if isinstance(event, ToolCallFinished):
            finished.append(event.call_id)

    sched = TurnScheduler(rec, query_concurrency=8)
    run = asyncio.create_task(sched.run_all(calls(Q, Q, Q, E, Q, sink=sink)))
    await settle()  # c0 completes, c1 and c2 hang
    assert finished == ["c0"]

    sched.cancel()
    results = await asyncio.wait_for(run, WAIT)

    assert sched.cancelled
    assert results[0].output == "out c0" and not results[0].is_error
    assert all(r.error_kind is ErrorKind.CANCELLED and "cancelled" in r.output for r in results[1:])
    assert "while running" in results[1].output and "before it started" in results[3].output
    assert sorted(rec.cancelled) == ["c1", "c2"]
    assert ("start", "c3") not in rec.log and ("start", "c4") not in rec.log
    assert sorted(finished) == ["c0", "c1", "c2", "c3", "c4"]
    assert not other_tasks()


async def test_cancelling_the_awaiting_task_returns_results() -> None:
    rec = Recorder()
    rec.gate("c0")
    sched = TurnScheduler(rec, query_concurrency=8)
    run = asyncio.create_task(sched.run_all(calls(Q, E)))
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)

    run.cancel()
    results = await asyncio.wait_for(run, WAIT)  # returns instead of raising

    assert sched.cancelled and not run.cancelled()
    assert [r.error_kind for r in results] == [ErrorKind.CANCELLED, ErrorKind.CANCELLED]
    assert rec.cancelled == ["c0"]
    assert not other_tasks()


async def test_cancel_while_still_streaming() -> None:
    rec = Recorder()
    rec.gate("c0")
    sched = TurnScheduler(rec, query_concurrency=2)
    sched.add(make_call(0, Q))
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)
    sched.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        sched.add(make_call(1, Q))
    results = await sched.results()
    assert [r.error_kind for r in results] == [ErrorKind.CANCELLED]
    assert not other_tasks()


async def test_cancel_before_any_call_ran() -> None:
    rec = Recorder()
    sched = TurnScheduler(rec, query_concurrency=2)
    for call in calls(Q, E):
        sched.add(call)
    sched.cancel()  # before the call tasks took their first step
    results = await sched.results()
    assert all(r.error_kind is ErrorKind.CANCELLED and "before it started" in r.output for r in results)
    assert rec.log == []
    assert not other_tasks()


async def test_a_call_without_a_lane_is_never_executed() -> None:
    rec = Recorder()
    finished: list[tuple[str, ErrorKind | None]] = []

    def sink(event) -> None:
        if isinstance(event, ToolCallFinished):
            finished.append((event.call_id, event.result.error_kind))

    results = await TurnScheduler(rec, query_concurrency=2).run_all(calls(Q, None, E, sink=sink))
    assert results[1].error_kind is ErrorKind.UNKNOWN_TOOL and "tool1" in results[1].output
    assert [r.output for r in (results[0], results[2])] == ["out c0", "out c2"]
    assert ("start", "c1") not in rec.log
    assert ("c1", ErrorKind.UNKNOWN_TOOL) in finished


async def test_streaming_leading_query_starts_before_input_closes() -> None:
    rec = Recorder()
    for cid in ("c0", "c1", "c2"):
        rec.gate(cid)
    sched = TurnScheduler(rec, query_concurrency=4)
    turn = calls(Q, E, Q)

    sched.add(turn[0])
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)  # the model is still streaming
    sched.add(turn[1])
    sched.add(turn[2])
    await settle()
    assert rec.log == [("start", "c0")]  # the execute call waits for c0, the query after it for the execute

    rec.gate("c0").set()
    await asyncio.wait_for(rec.started_event("c1").wait(), WAIT)
    await settle()
    assert ("start", "c2") not in rec.log
    rec.gate("c1").set()
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    rec.gate("c2").set()

    waiter = asyncio.create_task(sched.results())
    await settle()
    assert not waiter.done()  # results wait for close_input()
    sched.close_input()
    results = await asyncio.wait_for(waiter, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2"]
    with pytest.raises(RuntimeError, match="close_input"):
        sched.add(make_call(3, Q))


async def test_timings_come_from_the_call_unless_the_runner_measured_the_run() -> None:
    clock = Clock()

    async def executor(call: ToolCall) -> ToolResult:
        clock.now += 1  # waiting for a worker
        call.running("w1")
        clock.now += 2  # running
        if call.call_id == "c1":
            return ToolResult(output="remote", run_time=0.5, worker_id="w1")  # a worker timed the tool
        return ToolResult(output="here")

    c0, c1 = calls(Q, Q, clock=clock)
    results = await TurnScheduler(executor, query_concurrency=1).run_all([c0, c1])
    assert (results[0].queue_wait, results[0].run_time, results[0].worker_id) == (1.0, 2.0, "w1")
    # c1 waited for c0's slot (3 s) and for its worker (1 s); the worker's own run time stands.
    assert (results[1].queue_wait, results[1].run_time) == (4.0, 0.5)


async def test_a_shared_result_object_is_never_changed() -> None:
    shared = ToolResult(output="same")

    async def executor(call: ToolCall) -> ToolResult:
        return shared

    results = await TurnScheduler(executor, query_concurrency=2).run_all(calls(Q, Q))
    assert shared.run_time == 0.0 and shared.queue_wait == 0.0 and shared.worker_id == ""
    assert all(r.output == "same" for r in results)
    with pytest.raises(AttributeError):
        shared.output = "changed"  # type: ignore[misc]


async def test_each_call_emits_its_lifecycle_events() -> None:
    events: list[tuple[str, str]] = []

    def sink(event) -> None:
        name = type(event).__name__
        events.append((name, getattr(event, "call_id", None) or event.call.call_id))

    await TurnScheduler(Recorder(), query_concurrency=2).run_all(calls(E, Q, sink=sink))
    assert events == [("ToolCallStarted", "c0"), ("ToolCallFinished", "c0"),
                      ("ToolCallStarted", "c1"), ("ToolCallFinished", "c1")]


def test_a_lost_worker_is_reported_by_the_call_and_a_retry_is_a_new_attempt() -> None:
    events = []
    clock = Clock()
    call = make_call(0, Q, sink=events.append, clock=clock)
    call.assigned("w1", 1)
    call.lost("w1", "stream broke", 2)
    assert call.state is CallState.QUEUED
    clock.now += 1
    call.assigned("w2", 2)
    result = call.finish(ToolResult(output="ok", worker_id="w2", attempt=2, run_time=0.25))
    kinds = [type(e) for e in events]
    assert kinds == [ToolCallStarted, WorkerLost, CallRetried, ToolCallStarted, ToolCallFinished]
    assert events[2].attempt == 2 and events[2].previous_worker_id == "w1"
    assert (result.worker_id, result.attempt, result.queue_wait, result.run_time) == ("w2", 2, 1.0, 0.25)
    # Once finished, a call ignores later news.
    assert call.finish(ToolResult(output="late")) is result
    call.lost("w2", "gone", None)
    assert len(events) == 5


async def test_a_failing_event_sink_does_not_lose_results() -> None:
    def boom(event) -> None:
        raise ValueError("sink broken")

    results = await TurnScheduler(Recorder(), query_concurrency=2).run_all(calls(Q, E, sink=boom))
    assert [r.output for r in results] == ["out c0", "out c1"]


async def test_records_into_stats() -> None:
    stats = LaneStats()

    async def executor(call: ToolCall) -> ToolResult:
        if call.call_id == "c1":
            raise RuntimeError("x")
        return ToolResult(output="ok")

    await TurnScheduler(executor, query_concurrency=4).run_all(calls(Q, Q, E, None, stats=stats))
    snap = stats.snapshot()
    assert (snap[StatsLane.QUERY].completed, snap[StatsLane.QUERY].failed) == (1, 1)
    assert (snap[StatsLane.EXECUTE].completed, snap[StatsLane.EXECUTE].failed) == (1, 0)
    assert all(s.pending == 0 and s.active == 0 for s in snap.values())


async def test_stats_for_cancelled_calls() -> None:
    stats = LaneStats()
    rec = Recorder()
    rec.gate("c0")
    sched = TurnScheduler(rec, query_concurrency=4)
    sched.add(make_call(0, Q, stats=stats))
    sched.add(make_call(1, E, stats=stats))
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)
    assert stats.snapshot()[StatsLane.QUERY].active == 1
    assert stats.snapshot()[StatsLane.EXECUTE].pending == 1
    sched.cancel()
    await sched.results()
    snap = stats.snapshot()
    assert (snap[StatsLane.QUERY].active, snap[StatsLane.QUERY].failed) == (0, 1)
    assert (snap[StatsLane.EXECUTE].pending, snap[StatsLane.EXECUTE].failed) == (0, 1)


async def test_empty_turn_and_bad_concurrency() -> None:
    assert await TurnScheduler(Recorder(), query_concurrency=1).run_all([]) == []
    with pytest.raises(ValueError, match="query_concurrency"):
        TurnScheduler(Recorder(), query_concurrency=0)
