"""LaneStats: counters per lane and percentiles over a bounded window."""

from __future__ import annotations

import pytest

from session_server.stats import LATENCY_WINDOW, LaneSnapshot, LaneStats, StatsLane, percentile
from tool_worker.tools.base import Lane


def test_every_lane_present_and_empty() -> None:
    snap = LaneStats().snapshot()
    assert set(snap) == {StatsLane.QUERY, StatsLane.EXECUTE, StatsLane.GENERATE}
    assert {str(lane) for lane in snap} == {"query", "execute", "generate"}
    assert all(s == LaneSnapshot(0, 0, 0, 0, 0.0, 0.0, 0.0) for s in snap.values())


def test_counters_follow_the_lifecycle() -> None:
    stats = LaneStats()
    for _ in range(3):
        stats.enqueued(Lane.QUERY)
    stats.started(Lane.QUERY)
    stats.started(Lane.QUERY)
    s = stats.snapshot()[StatsLane.QUERY]
    assert (s.pending, s.active, s.completed, s.failed) == (1, 2, 0, 0)

    stats.finished(Lane.QUERY, True, 0.1)
    stats.finished(Lane.QUERY, False, 0.2)
    stats.withdrawn(Lane.QUERY)
    s = stats.snapshot()[StatsLane.QUERY]
    assert (s.pending, s.active, s.completed, s.failed) == (0, 0, 1, 2)
    assert stats.snapshot()[StatsLane.EXECUTE].completed == 0


def test_lane_keys_accept_lane_statslane_and_string() -> None:
    stats = LaneStats()
    stats.enqueued(Lane.EXECUTE)
    stats.enqueued(StatsLane.EXECUTE)
    stats.enqueued("execute")
    stats.enqueued(StatsLane.GENERATE)
    snap = stats.snapshot()
    assert snap[StatsLane.EXECUTE].pending == 3
    assert snap[StatsLane.GENERATE].pending == 1
    with pytest.raises(ValueError):
        stats.enqueued("control")


def test_percentiles() -> None:
    stats = LaneStats()
    for ms in range(1, 101):
        stats.enqueued(StatsLane.GENERATE)
        stats.started(StatsLane.GENERATE)
        stats.finished(StatsLane.GENERATE, True, ms / 1000)
    s = stats.snapshot()[StatsLane.GENERATE]
    assert (s.p50, s.p90, s.p99) == (0.05, 0.09, 0.099)
    assert s.completed == 100


def test_percentiles_use_only_the_recent_window() -> None:
    stats = LaneStats()
    for _ in range(LATENCY_WINDOW):
        stats.finished(Lane.QUERY, True, 10.0)
    for _ in range(LATENCY_WINDOW):
        stats.finished(Lane.QUERY, True, 0.5)
    s = stats.snapshot()[StatsLane.QUERY]
    assert (s.p50, s.p90, s.p99) == (0.5, 0.5, 0.5)
    assert s.completed == 2 * LATENCY_WINDOW


def test_percentile_edges() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 1) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 99) == 2.0
    assert percentile([1.0, 2.0], 0) == 1.0
