"""TurnScheduler with fake executors: ordering, bounds, failures, cancellation, streaming."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from session_server.scheduler import ScheduledCall, TurnScheduler
from session_server.stats import LaneStats, StatsLane
from tool_worker.tools.base import ErrorKind, Lane, ToolResult

Q, E = Lane.QUERY, Lane.EXECUTE
WAIT = 2.0  # upper bound for anything that should happen at once; tests finish in milliseconds


def calls(*lanes: Lane | None) -> list[ScheduledCall]:
    return [ScheduledCall(i, f"c{i}", f"tool{i}", "{}", lane) for i, lane in enumerate(lanes)]


class Recorder:
    """An executor that logs start/end, optionally blocks each call on a gate, and tracks concurrency."""

    def __init__(self, delay: float = 0.0) -> None:
        self.log: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.delay = delay
        self.running = 0
        self.max_running = 0
        self.cancelled: list[str] = []

    def gate(self, call_id: str) -> asyncio.Event:
        return self.gates.setdefault(call_id, asyncio.Event())

    def started_event(self, call_id: str) -> asyncio.Event:
        return self.started.setdefault(call_id, asyncio.Event())

    async def __call__(self, call: ScheduledCall) -> ToolResult:
        self.log.append(("start", call.call_id))
        self.started_event(call.call_id).set()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if call.call_id in self.gates:
                await self.gates[call.call_id].wait()
            if self.delay:
                await asyncio.sleep(self.delay)
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

    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)
    await asyncio.wait_for(rec.started_event("c1").wait(), WAIT)
    await asyncio.sleep(0.005)
    assert rec.log == [("start", "c0"), ("start", "c1")]  # the execute call and the query after it wait

    rec.gate("c1").set()
    await asyncio.sleep(0.005)
    assert ("start", "c2") not in rec.log  # c0 still running
    rec.gate("c0").set()
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    await asyncio.sleep(0.005)
    assert ("start", "c3") not in rec.log  # waits for the execute call
    rec.gate("c2").set()
    await asyncio.wait_for(rec.started_event("c3").wait(), WAIT)
    rec.gate("c3").set()

    results = await asyncio.wait_for(run, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2", "out c3"]
    assert rec.pos("end", "c0") < rec.pos("start", "c2") and rec.pos("end", "c1") < rec.pos("start", "c2")
    assert rec.pos("end", "c2") < rec.pos("start", "c3")
    assert rec.max_running == 2


async def test_read_after_write_sees_new_content(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    async def files(call: ScheduledCall) -> ToolResult:
        if call.tool_name == "write":
            await asyncio.sleep(0.01)  # a slow write: a read that did not wait for it would see "old"
            target.write_text(call.arguments_json)
            return ToolResult(output="wrote")
        return ToolResult(output=target.read_text())

    turn = [
        ScheduledCall(0, "r0", "read", "", Q),
        ScheduledCall(1, "w1", "write", "new", E),
        ScheduledCall(2, "r2", "read", "", Q),
        ScheduledCall(3, "w3", "write", "newer", E),
        ScheduledCall(4, "r4", "read", "", Q),
    ]
    results = await TurnScheduler(files, query_concurrency=4).run_all(turn)
    assert [r.output for r in results] == ["old", "wrote", "new", "wrote", "newer"]
    assert target.read_text() == "newer"


async def test_results_in_model_order_whatever_completion_order() -> None:
    rec = Recorder()
    finished: list[str] = []
    done = {f"c{i}": asyncio.Event() for i in range(5)}

    def on_finish(call: ScheduledCall, result: ToolResult) -> None:
        finished.append(call.call_id)
        done[call.call_id].set()

    sched = TurnScheduler(rec, query_concurrency=8, on_finish=on_finish)
    for cid in done:
        rec.gate(cid)
    run = asyncio.create_task(sched.run_all(calls(Q, Q, Q, Q, Q)))
    for cid in reversed(done):
        rec.gate(cid).set()
        await asyncio.wait_for(done[cid].wait(), WAIT)

    results = await asyncio.wait_for(run, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2", "out c3", "out c4"]
    assert finished == ["c4", "c3", "c2", "c1", "c0"]  # events come in completion order


async def test_a_call_cancelled_while_it_waits_says_it_did_not_run() -> None:
    # The executor may say a started call waits (for a confirmation) before it runs: its
    # cancellation then says so, not "while running; its effects may be partial".
    asking = asyncio.Event()
    sched: TurnScheduler

    async def confirm_then_run(call: ScheduledCall) -> ToolResult:
        sched.waiting(call, "its confirmation")
        asking.set()
        await asyncio.Event().wait()  # nobody answers
        raise AssertionError("unreachable")

    sched = TurnScheduler(confirm_then_run, query_concurrency=2)
    run = asyncio.create_task(sched.run_all(calls(E)))
    await asyncio.wait_for(asking.wait(), WAIT)
    sched.cancel()
    [result] = await asyncio.wait_for(run, WAIT)
    assert result.error_kind is ErrorKind.CANCELLED
    assert "while waiting for its confirmation; it did not run" in result.output
    assert result.run_time == 0 and result.queue_wait > 0


async def test_query_concurrency_bound() -> None:
    rec = Recorder(delay=0.003)
    results = await TurnScheduler(rec, query_concurrency=3).run_all(calls(*[Q] * 10))
    assert len(results) == 10 and not any(r.is_error for r in results)
    assert rec.max_running == 3


async def test_failures_leave_siblings_alone() -> None:
    async def flaky(call: ScheduledCall) -> ToolResult:
        await asyncio.sleep(0.001)
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
    sched = TurnScheduler(rec, query_concurrency=8, on_finish=lambda c, r: finished.append(c.call_id))
    run = asyncio.create_task(sched.run_all(calls(Q, Q, Q, E, Q)))
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    await asyncio.sleep(0.002)  # c0 completes, c1 and c2 hang

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
    sched.add(calls(Q)[0])
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)
    sched.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        sched.add(ScheduledCall(1, "c1", "tool1", "{}", Q))
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


async def test_unknown_lane_never_executed() -> None:
    rec = Recorder()
    finished: list[tuple[str, ErrorKind | None]] = []
    sched = TurnScheduler(rec, query_concurrency=2, on_finish=lambda c, r: finished.append((c.call_id, r.error_kind)))
    results = await sched.run_all(calls(Q, None, E))
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
    await asyncio.sleep(0.005)
    assert rec.log == [("start", "c0")]  # the execute call waits for c0, the query after it for the execute

    rec.gate("c0").set()
    await asyncio.wait_for(rec.started_event("c1").wait(), WAIT)
    await asyncio.sleep(0.005)
    assert ("start", "c2") not in rec.log
    rec.gate("c1").set()
    await asyncio.wait_for(rec.started_event("c2").wait(), WAIT)
    rec.gate("c2").set()

    waiter = asyncio.create_task(sched.results())
    await asyncio.sleep(0.005)
    assert not waiter.done()  # results wait for close_input()
    sched.close_input()
    results = await asyncio.wait_for(waiter, WAIT)
    assert [r.output for r in results] == ["out c0", "out c1", "out c2"]
    with pytest.raises(RuntimeError, match="close_input"):
        sched.add(ScheduledCall(3, "c3", "tool3", "{}", Q))


async def test_timings_recorded_unless_executor_set_them() -> None:
    async def executor(call: ScheduledCall) -> ToolResult:
        await asyncio.sleep(0.005)
        if call.call_id == "c2":
            return ToolResult(output="remote", queue_wait=1.5, run_time=2.5)
        return ToolResult(output="local")

    results = await TurnScheduler(executor, query_concurrency=1).run_all(calls(Q, Q, Q))
    assert results[0].run_time >= 0.004 and results[0].queue_wait < results[1].queue_wait
    assert results[1].queue_wait >= 0.004  # waited for the single query slot
    assert (results[2].queue_wait, results[2].run_time) == (1.5, 2.5)


async def test_shared_result_object_not_mutated() -> None:
    shared = ToolResult(output="same")

    async def executor(call: ScheduledCall) -> ToolResult:
        return shared

    results = await TurnScheduler(executor, query_concurrency=2).run_all(calls(Q, Q))
    assert shared.run_time == 0.0 and shared.queue_wait == 0.0
    assert all(r.output == "same" for r in results)


async def test_on_start_and_events() -> None:
    events: list[tuple[str, str]] = []
    rec = Recorder()
    sched = TurnScheduler(
        rec,
        query_concurrency=2,
        on_start=lambda c: events.append(("start", c.call_id)),
        on_finish=lambda c, r: events.append(("finish", c.call_id)),
    )
    await sched.run_all(calls(E, Q))
    assert events == [("start", "c0"), ("finish", "c0"), ("start", "c1"), ("finish", "c1")]


async def test_failing_callback_does_not_lose_results() -> None:
    def boom(call: ScheduledCall, result: ToolResult) -> None:
        raise ValueError("sink broken")

    results = await TurnScheduler(Recorder(), query_concurrency=2, on_finish=boom).run_all(calls(Q, E))
    assert [r.output for r in results] == ["out c0", "out c1"]


async def test_records_into_stats() -> None:
    stats = LaneStats()

    async def executor(call: ScheduledCall) -> ToolResult:
        await asyncio.sleep(0.002)
        if call.call_id == "c1":
            raise RuntimeError("x")
        return ToolResult(output="ok")

    await TurnScheduler(executor, query_concurrency=4, stats=stats).run_all(calls(Q, Q, E, None))
    snap = stats.snapshot()
    assert (snap[StatsLane.QUERY].completed, snap[StatsLane.QUERY].failed) == (1, 1)
    assert (snap[StatsLane.EXECUTE].completed, snap[StatsLane.EXECUTE].failed) == (1, 0)
    assert all(s.pending == 0 and s.active == 0 for s in snap.values())
    assert snap[StatsLane.QUERY].p50 >= 0.001


async def test_stats_for_cancelled_calls() -> None:
    stats = LaneStats()
    rec = Recorder()
    rec.gate("c0")
    sched = TurnScheduler(rec, query_concurrency=4, stats=stats)
    sched.add(calls(Q)[0])
    sched.add(ScheduledCall(1, "c1", "tool1", "{}", E))
    await asyncio.wait_for(rec.started_event("c0").wait(), WAIT)
    assert stats.snapshot()[StatsLane.QUERY].active == 1
    assert stats.snapshot()[StatsLane.EXECUTE].pending == 1
    sched.cancel()
    await sched.results()
    snap = stats.snapshot()
    assert (snap[StatsLane.QUERY].active, snap[StatsLane.QUERY].failed) == (0, 1)
    assert (snap[StatsLane.EXECUTE].pending, snap[StatsLane.EXECUTE].failed) == (0, 1)


async def test_overhead_per_call_is_small() -> None:
    async def noop(call: ScheduledCall) -> ToolResult:
        return ToolResult(output="")

    n = 1000
    lanes = [Q if i % 10 else E for i in range(n)]
    start = time.perf_counter()
    results = await TurnScheduler(noop, query_concurrency=16).run_all(calls(*lanes))
    per_call = (time.perf_counter() - start) / n
    assert len(results) == n
    # Tens of microseconds on a quiet machine; the bound leaves room for a loaded CI box and still
    # fails on any polling or sleeping.
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per call"


async def test_empty_turn_and_bad_concurrency() -> None:
    assert await TurnScheduler(Recorder(), query_concurrency=1).run_all([]) == []
    with pytest.raises(ValueError, match="query_concurrency"):
        TurnScheduler(Recorder(), query_concurrency=0)
