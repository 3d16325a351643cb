"""Queue figures per lane, for AdminService.GetQueueStats.

One `LaneStats` is shared by the whole server: every turn's scheduler records its tool calls
into it, the Generate lane's limiter (`llm.limiter.LimitedProvider`) its model requests under
`StatsLane.GENERATE`, pending while one waits for a `--max-llm-requests` slot. Everything runs on
the event loop's thread, so there are no locks.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from tool_worker.tools.base import Lane

# Latency percentiles are taken over this many most recent samples per lane, so a snapshot
# costs a bounded sort and reflects current behaviour rather than the server's whole life.
LATENCY_WINDOW = 2048


class StatsLane(enum.StrEnum):
    """The lanes queue figures are kept for: the tool lanes of `Lane`, plus LLM requests."""

    QUERY = Lane.QUERY.value
    EXECUTE = Lane.EXECUTE.value
    GENERATE = "generate"


@dataclass(frozen=True)
class LaneSnapshot:
    """One lane's figures at one moment. Latencies are seconds, 0.0 when there is no sample."""

    pending: int
    active: int
    completed: int
    failed: int
    p50: float
    p90: float
    p99: float


@dataclass
class _Counters:
    pending: int = 0
    active: int = 0
    completed: int = 0
    failed: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class LaneStats:
    """Counters and recent latencies per lane.

    A unit of work moves `enqueued` -> `started` -> `finished` (a tool call is started when an
    attempt runs, and `requeued` when it is sent again); one that ends without ever starting
    (cancelled while queued) leaves with `withdrawn` and counts as failed. Lanes are
    given as `Lane`, `StatsLane` or their string value.
    """

    def __init__(self) -> None:
        self._lanes = {lane: _Counters() for lane in StatsLane}

    def enqueued(self, lane: Lane | StatsLane | str) -> None:
        self._lanes[StatsLane(lane)].pending += 1

    def started(self, lane: Lane | StatsLane | str) -> None:
        c = self._lanes[StatsLane(lane)]
        c.pending = max(0, c.pending - 1)
        c.active += 1

    def finished(self, lane: Lane | StatsLane | str, ok: bool, latency_seconds: float) -> None:
        c = self._lanes[StatsLane(lane)]
        c.active = max(0, c.active - 1)
        if ok:
            c.completed += 1
        else:
            c.failed += 1
        c.latencies.append(max(0.0, latency_seconds))

    def requeued(self, lane: Lane | StatsLane | str) -> None:
        """A started unit waits again (its worker was lost: it is sent again)."""
        c = self._lanes[StatsLane(lane)]
        c.active = max(0, c.active - 1)
        c.pending += 1

    def withdrawn(self, lane: Lane | StatsLane | str) -> None:
        c = self._lanes[StatsLane(lane)]
        c.pending = max(0, c.pending - 1)
        c.failed += 1

    def snapshot(self) -> dict[StatsLane, LaneSnapshot]:
        """Every lane's figures, including lanes that saw no work yet."""
        return {lane: _snapshot(c) for lane, c in self._lanes.items()}


def _snapshot(c: _Counters) -> LaneSnapshot:
    ordered = sorted(c.latencies)
    return LaneSnapshot(
        pending=c.pending,
        active=c.active,
        completed=c.completed,
        failed=c.failed,
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
    )


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 for an empty one."""
    if not ordered:
        return 0.0
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]
