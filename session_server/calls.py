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

It is also where a call is observed, in one place: its metrics (by lane, tool and outcome; queue
wait and run time; retries) when it finishes, and, when the server traces, its `execute_tool
{tool}` span, from its creation (a child of the turn's `invoke_agent` span, the current span
where the turn makes its calls) to its result. The span's context travels with each attempt to
the worker or external client that runs it (`trace_context`).

Admission: a Query call counts against the server's pending Query call limits from its creation
to its result; over a limit, it is created already rejected with an AT_CAPACITY result.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from session_server import telemetry as attrs
from session_server.admission import Admission
from session_server.events import CallInfo, CallRetried, EventPayload, ToolCallFinished, ToolCallStarted, WorkerLost
from session_server.metrics import NO_LANE, OK, UNKNOWN_TOOL, CallSeries
from session_server.stats import LaneStats
from session_server.telemetry import Telemetry
from tool_worker.effects import EVERYTHING, Effects
from tool_worker.telemetry import logs as log_context
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
    # earlier calls it could observe or disturb (everything, unless its tool says less). Either
    # the Effects, or a function that works them out (resolving symlinks costs system calls),
    # called at most once, when the scheduler first compares the call with a call of the other
    # lane: a turn of Query calls alone never pays for it (`touches()`).
    effects: Effects | Callable[[], Effects] = EVERYTHING
    stats: LaneStats | None = None
    telemetry: Telemetry | None = None
    admission: Admission | None = None
    session_id: str = ""
    # Seconds, monotonic; tests give their own.
    clock: Callable[[], float] = time.perf_counter
    added: float = -1.0
    state: CallState = CallState.QUEUED
    waiting_for: str | None = None
    started: float | None = None
    worker_id: str = ""
    attempt: int = 1
    result: ToolResult | None = None
    # Someone confirmed it (the policy asked): it may read what the read ask rules name.
    confirmed: bool = False
    _begun: bool = False
    # Counted active in the lane's stats: an attempt runs (a worker, the server, a client has it).
    _active: bool = False
    _admitted: bool = False
    _series: CallSeries | None = None
    # The execute_tool span (tracing on), and its W3C context once asked for.
    _span: Any = None
    _trace_context: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.added < 0:
            self.added = self.clock()
        if self.lane is Lane.QUERY and self.admission is not None:
            refusal = self.admission.admit_query_call(self.session_id)
            if refusal is None:
                self._admitted = True
            else:
                self.rejection = ToolResult.error(ErrorKind.AT_CAPACITY, f"{self.tool_name} was not run: {refusal}.")
        if self.lane is not None and self.stats is not None:
            self.stats.enqueued(self.lane)
        if self.telemetry is not None:
            self._observe(self.telemetry)

    def _observe(self, telemetry: Telemetry) -> None:
        tool = self.spec.name if self.spec is not None else UNKNOWN_TOOL
        lane = self.lane
        self._series = telemetry.metrics.calls(lane.value if lane is not None else NO_LANE, tool)
        if telemetry.tracing is not None:
            self._span = telemetry.tracing.start(
                f"execute_tool {tool}",
                attributes={
                    attrs.OPERATION: "execute_tool",
                    attrs.TOOL_NAME: self.tool_name,
                    attrs.TOOL_CALL_ID: self.call_id,
                    attrs.TOOL_TYPE: "function",
                    attrs.CONVERSATION_ID: self.session_id,
                    "codelane.lane": lane.value if lane is not None else NO_LANE,
                },
            )

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

    def touches(self) -> Effects:
        """The call's effects, worked out now if they were given as a function."""
        effects = self.effects
        if not isinstance(effects, Effects):
            effects = self.effects = effects()
        return effects

    @property
    def trace_context(self) -> tuple[str, str]:
        """W3C (traceparent, tracestate) of the call's span, for whoever runs it elsewhere; empty
        strings when the server does not trace."""
        if self._trace_context is None:
            span, telemetry = self._span, self.telemetry
            traced = span is not None and telemetry is not None and telemetry.tracing is not None
            self._trace_context = telemetry.tracing.carrier(span) if traced else ("", "")
        return self._trace_context

    # -- transitions ---------------------------------------------------------------------------

    def begin(self) -> None:
        """The scheduler let the call go (its lane slot is held). It stays pending in the lane's
        stats until an attempt runs: it may wait for a worker, a confirmation or a client."""
        self._begun = True

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
        if not self._active and self.stats is not None and self.lane is not None:
            self._active = True
            self.stats.started(self.lane)
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
        if self._span is not None:
            self._span.add_event("worker_lost", {"codelane.worker.id": worker_id, "codelane.reason": reason})
        if next_attempt is not None:
            self.retried(next_attempt, f"worker {worker_id} lost: {reason}", worker_id)

    def retried(self, next_attempt: int, reason: str, previous_worker_id: str) -> None:
        """The call is sent again (attempt `next_attempt`): its worker was lost, or its snapshot
        went stale before the worker could fetch it."""
        if self.state is CallState.FINISHED:
            return
        if self._series is not None:
            self._series.retries.inc()
        if self._active and self.stats is not None and self.lane is not None:
            self._active = False
            self.stats.requeued(self.lane)
        self.state = CallState.QUEUED
        # The call waits again, and has run nowhere yet: a result made without a run (the pool's
        # NO_WORKER once no worker is left) must not read as a run on the lost worker, its wait
        # (the heartbeat timeout, the wait for another worker) as run time, nor as attempt 1.
        self.started = None
        self.worker_id, self.attempt = "", next_attempt
        self._emit(CallRetried(self.call_id, next_attempt, reason, previous_worker_id))

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
                if not self._active:  # it waited to the end (a confirmation refused, a client that never came)
                    self.stats.started(self.lane)
                self._active = False
                self.stats.finished(self.lane, not result.is_error, result.queue_wait + result.run_time)
            else:
                self.stats.withdrawn(self.lane)
        self._emit(ToolCallFinished(self.call_id, self.tool_name, result, result.queue_wait, result.run_time))
        if self._admitted:
            self._admitted = False
            self.admission.release_query_call(self.session_id)
        outcome = OK if not result.is_error else (result.error_kind or ErrorKind.TOOL_ERROR).value
        if self._series is not None:
            self._series.finished(outcome, result.queue_wait, result.run_time, self._begun,
                                  ran=self.started is not None)
            if self._span is not None:
                self._end_span(result, outcome)
        if log.isEnabledFor(logging.DEBUG):
            # A call that never runs (unknown tool, bad arguments, denied, refused at capacity) ends
            # in the turn's task, not a task of its own that names it: its line names it here.
            named = log_context.call_id.set(self.call_id)
            try:
                log.debug("call %s (%s) %s on %s, attempt %d: queued %.2f ms, ran %.2f ms", self.call_id,
                          self.tool_name, outcome, result.worker_id or "-", result.attempt,
                          result.queue_wait * 1e3, result.run_time * 1e3)
            finally:
                log_context.call_id.reset(named)
        return result

    def _end_span(self, result: ToolResult, outcome: str) -> None:
        span = self._span
        span.set_attribute("codelane.outcome", outcome)
        if result.worker_id:
            span.set_attribute("codelane.worker.id", result.worker_id)
            span.set_attribute("codelane.attempt", result.attempt)
        if result.is_error:
            # The outcome only: a result's text may quote files, which a trace has no business holding.
            self.telemetry.tracing.fail(span, outcome, f"{self.tool_name} ended with {outcome}")
        span.end()

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
