"""Time that moves only when a test moves it: a clock and the timers that run on it.

Code that takes a clock and a `call_later` (asyncio's signature) runs on this in tests: leases,
deadlines and waits end exactly when the test says `advance()`, never because the machine was
slow or fast.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ManualTimer:
    """One pending callback; `cancel()` drops it."""

    due: float
    callback: Callable[..., object]
    args: tuple[object, ...]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class ManualTime:
    """`now()` is the clock (epoch-like seconds); `call_later` schedules on it; `advance` moves
    it on and runs what fell due, in order of due time (then of scheduling)."""

    current: float = 1_700_000_000.0
    _queue: list[tuple[float, int, ManualTimer]] = field(default_factory=list)
    _order: itertools.count = field(default_factory=itertools.count)

    def now(self) -> float:
        return self.current

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> ManualTimer:
        timer = ManualTimer(self.current + max(0.0, delay), callback, args)
        heapq.heappush(self._queue, (timer.due, next(self._order), timer))
        return timer

    def pending(self) -> int:
        """Timers scheduled and not cancelled (a test checks that nothing was left behind)."""
        return sum(1 for _, _, timer in self._queue if not timer.cancelled)

    def advance(self, seconds: float) -> None:
        """Moves the clock `seconds` on, running every timer due by then (a callback may add more)."""
        until = self.current + seconds
        while self._queue and self._queue[0][0] <= until:
            due, _, timer = heapq.heappop(self._queue)
            self.current = max(self.current, due)
            if not timer.cancelled:
                timer.callback(*timer.args)
        self.current = until
