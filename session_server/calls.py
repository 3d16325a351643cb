"""One tool call's life, owned by one object: its state, its timings, its events and its result.

A `ToolCall` is made for every call of a model response, runnable or not. Whoever moves it along
(the scheduler, the worker pool, the external tasks, the in-process runner) tells it what
happened; only it emits the call's events and computes its timings, so there is one place to read
how a call went:

    QUEUED --begin()--> (WAITING: a confirmation, an external client) --running()--> RUNNING
       \\                                                                              |
        +----------------------------- finish(result) ------------------------------> FINISHED

- `ToolCallStarted` is emitted by `running()`, once per attempt (a retry is a new attempt);
- `WorkerLost` and `CallRetried` by `lost()`;
- `ToolCallFinished` by `finish()`, exactly once.
- `queue_wait` runs from the call's creation to the start of the attempt that produced the result;
  `run_time` is the runner's own measure when it has one (a worker times the tool), else the time
  since that start.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from session_server.events import CallInfo, CallRetried, EventPayload, ToolCallFinished, ToolCallStarted, WorkerLost
from session_server.stats import LaneStats
from tool_worker.effects import EVERYTHING, Effects
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

EventSink = Callable[[EventPayload], None]

log = logging.getLogger(__name__)


class CallState(enum.Enum):
    # Waiting for earlier calls (an Execute barrier) or for a lane slot.
    QUEUED = "queued"
    # Let go by the scheduler, waiting for something before it runs (`waiting_for` says what).
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class ToolCall:
    """One call of a model response. `rejection` is set when it will never run (unknown tool,
    arguments that do not parse, a denying policy): its result, as the model will read it."""

    info: CallInfo
    sink: EventSink
    spec: ToolSpec | None = None
    arguments: dict[str, Any] | None = None
    rejection: ToolResult | None = None
    # What the call may read and write in the workspace: the scheduler orders it against the
    # earlier calls it could observe or disturb (everything, unless its tool says less).
    effects: Effects = EVERYTHING
    stats: LaneStats | None = None
    # Seconds, monotonic; tests give their own.
    clock: Callable[[], float] = time.perf_counter
    added: float = -1.0
    state: CallState = CallState.QUEUED
    waiting_for: str | None = None
    started: float | None = None
    worker_id: str = ""
    attempt: int = 1
    result: ToolResult | None = None
    _begun: bool = False

    def __post_init__(self) -> None:
        if self.added < 0:
            self.added = self.clock()
        if self.lane is not None and self.stats is not None:
            self.stats.enqueued(self.lane)

    @property
    def call_id(self) -> str:
        return self.info.call_id

    @property
    def tool_name(self) -> str:
        return self.info.tool_name

    @property
    def lane(self) -> Lane | None:
        """None for a call that never runs."""
        return None if self.rejection is not None or self.spec is None else self.spec.lane

    # -- transitions ---------------------------------------------------------------------------

    def begin(self) -> None:
        """The scheduler let the call go (its lane slot is held)."""
        self._begun = True
        if self.stats is not None and self.lane is not None:
            self.stats.started(self.lane)

    def wait_for(self, what: str | None) -> None:
        """The call waits for `what` (e.g. "its confirmation") before it runs; None: no more."""
        self.waiting_for = what
        if what is not None:
            self.state = CallState.WAITING

    def running(self, worker_id: str, attempt: int = 1) -> None:
        """An attempt started on `worker_id` ("local" in-process, or a client's id)."""
        if self.state is CallState.FINISHED:
            return
        self.state = CallState.RUNNING
        self.waiting_for = None
        self.started = self.clock()
        self.worker_id, self.attempt = worker_id, attempt
        self._emit(ToolCallStarted(self.info, self.info.lane, worker_id, attempt))

    # The worker pool's PlacementObserver.
    def assigned(self, worker_id: str, attempt: int) -> None:
        self.running(worker_id, attempt)

    def lost(self, worker_id: str, reason: str, next_attempt: int | None) -> None:
        if self.state is CallState.FINISHED:
            return
        self._emit(WorkerLost(worker_id, reason, [self.call_id]))
        if next_attempt is not None:
            self.state = CallState.QUEUED
            self._emit(CallRetried(self.call_id, next_attempt, f"worker {worker_id} lost: {reason}", worker_id))

    def finish(self, result: ToolResult) -> ToolResult:
        """Ends the call with `result` (once: later results are ignored); returns the result as
        recorded, with its timings and where it ran."""
        if self.result is not None:
            return self.result
        now = self.clock()
        start = self.started if self.started is not None else now
        ran_here = not result.worker_id
        result = dataclasses.replace(
            result,
            queue_wait=max(0.0, start - self.added),
            run_time=result.run_time or (now - start if self.started is not None else 0.0),
            worker_id=result.worker_id or self.worker_id,
            attempt=self.attempt if ran_here else result.attempt,
        )
        self.result = result
        self.state = CallState.FINISHED
        if self.stats is not None and self.lane is not None:
            if self._begun:
                self.stats.finished(self.lane, not result.is_error, result.queue_wait + result.run_time)
            else:
                self.stats.withdrawn(self.lane)
        self._emit(ToolCallFinished(self.call_id, self.tool_name, result, result.queue_wait, result.run_time))
        return result

    def _emit(self, payload: EventPayload) -> None:
        try:
            self.sink(payload)
        except Exception:
            # A broken event sink must not cost the call its result, nor stall the turn.
            log.exception("call %s: emitting %s failed", self.call_id, type(payload).__name__)

    def cancelled_result(self) -> ToolResult:
        """What a cancelled call tells the model: whether it ran, and so whether it had effects."""
        head = f"Tool call {self.call_id} ({self.tool_name}) was cancelled"
        if self.state is CallState.WAITING and self.waiting_for is not None:
            return ToolResult.error(ErrorKind.CANCELLED,
                                    f"{head} while waiting for {self.waiting_for}; it did not run.")
        if self.state is CallState.RUNNING:
            where = f" on {self.worker_id}" if self.worker_id and self.worker_id != "local" else ""
            return ToolResult.error(ErrorKind.CANCELLED, f"{head} while running{where}; its effects may be partial.")
        return ToolResult.error(ErrorKind.CANCELLED, f"{head} before it started.")
