"""A call's owner (`calls.ToolCall`) on a manual clock: what its result and metrics say after its
worker was lost and the retry found no worker."""

from __future__ import annotations

from session_server.calls import ToolCall
from session_server.events import CallInfo, ToolCallFinished
from session_server.metrics import ServerMetrics
from session_server.stats import LaneStats, StatsLane
from session_server.telemetry import Telemetry
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run_count(metrics: ServerMetrics) -> float:
    return metrics.registry.get_sample_value("codelane_tool_call_run_seconds_count", {"lane": "query", "tool": "nap"})


def test_a_call_whose_retry_found_no_worker_ran_nowhere_and_waited_the_whole_time() -> None:
    clock, events, metrics = Clock(), [], ServerMetrics()
    call = ToolCall(CallInfo("c1", "nap", "{}", "query", 0), events.append, clock=clock,
                    spec=ToolSpec("nap", "", {}, Lane.QUERY, True), telemetry=Telemetry(metrics))
    call.begin()
    clock.now += 0.01
    call.assigned("w1", 1)
    clock.now += 11.0  # silent, then lost after the heartbeat timeout, and retried
    call.lost("w1", "no heartbeat", next_attempt=2)
    clock.now += 1.0  # no worker came back
    result = call.finish(ToolResult.error(ErrorKind.NO_WORKER, "no worker offers nap"))

    assert (result.worker_id, result.attempt, result.run_time) == ("", 2, 0.0)
    assert abs(result.queue_wait - 12.01) < 1e-9
    assert isinstance(events[-1], ToolCallFinished) and events[-1].result == result
    assert not _run_count(metrics)  # it never finished a run: nothing counted as one


def test_a_call_retried_then_run_by_another_worker_reports_that_run() -> None:
    clock, metrics = Clock(), ServerMetrics()
    call = ToolCall(CallInfo("c1", "nap", "{}", "query", 0), lambda _: None, clock=clock,
                    spec=ToolSpec("nap", "", {}, Lane.QUERY, True), telemetry=Telemetry(metrics))
    call.begin()
    call.assigned("w1", 1)
    clock.now += 6.0
    call.lost("w1", "connection broke", next_attempt=2)
    clock.now += 0.5
    call.assigned("w2", 2)
    clock.now += 0.25
    result = call.finish(ToolResult(output="ok", worker_id="w2", attempt=2, run_time=0.2))

    assert (result.worker_id, result.attempt, result.run_time) == ("w2", 2, 0.2)
    assert _run_count(metrics) == 1


def _figures(stats: LaneStats) -> tuple[int, int, int, int]:
    lane = stats.snapshot()[StatsLane.QUERY]
    return lane.pending, lane.active, lane.completed, lane.failed


def test_a_call_is_active_in_the_queue_figures_only_while_an_attempt_runs() -> None:
    # Counted active from its session's slot on: 6 calls on 2 workers of 2 slots each read
    # "active 6" while 4 ran (the others waited for a worker slot, a confirmation, a client).
    stats = LaneStats()
    spec = ToolSpec("grep", "", {"type": "object"}, Lane.QUERY, True)
    call = ToolCall(CallInfo("c1", "grep", "{}", "query", 0), lambda event: None, spec=spec, stats=stats)
    assert _figures(stats) == (1, 0, 0, 0)
    call.begin()
    call.wait_for("a worker slot")
    assert _figures(stats) == (1, 0, 0, 0)
    call.running("w1")
    assert _figures(stats) == (0, 1, 0, 0)
    call.retried(2, "worker w1 lost", "w1")  # waits again
    assert _figures(stats) == (1, 0, 0, 0)
    call.running("w2", 2)
    call.finish(ToolResult(output="ok"))
    assert _figures(stats) == (0, 0, 1, 0)

    refused = ToolCall(CallInfo("c2", "grep", "{}", "query", 1), lambda event: None, spec=spec, stats=stats)
    refused.begin()
    refused.wait_for("its confirmation")
    refused.finish(ToolResult.error(ErrorKind.PERMISSION_DENIED, "rejected"))  # never ran
    assert _figures(stats) == (0, 0, 1, 1)
