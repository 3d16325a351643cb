"""What a tool worker reports about itself: its Prometheus metrics (`codelane worker
--metrics-listen`), its readiness on gRPC health (`--health-listen`: SERVING while it holds a
stream to the hub and takes calls), and, tracing on, a `run_tool {tool}` span per call, a child of
the server's `execute_tool` span named in the call's Assign.trace_context.

The calls' series are bound once per (tool, outcome); a call whose Assign carries no trace context
(the server does not trace) gets no span.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from codelane.v1 import worker_pb2
from tool_worker.telemetry import logs as log_context
from tool_worker.tools.base import ErrorKind, ToolResult

if TYPE_CHECKING:
    from tool_worker.telemetry.tracing import Tracing

CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
log = logging.getLogger("codelane.worker")

PLACEMENT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """Every metric of one worker process, on a registry of its own."""

    def __init__(self, slots: int, registry: CollectorRegistry | None = None) -> None:
        # The `_created` twin of every counter and histogram doubles the page for no use here.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.calls = Counter("codelane_worker_calls", "Calls this worker ran, by tool and outcome (ok, or the "
                             "error kind).", ["tool", "outcome"], registry=r)
        self.run_time = Histogram("codelane_worker_call_run_seconds", "Run time of calls on this worker.",
                                  ["tool"], buckets=CALL_BUCKETS, registry=r)
        Gauge("codelane_worker_slots", "Calls this worker runs at once at most (--slots).",
              registry=r).set(slots)
        # Read at scrape time: `in_flight.set_function(...)` once the worker exists.
        self.in_flight = Gauge("codelane_worker_calls_in_flight", "Calls running on this worker now.", registry=r)
        self.connected = Gauge("codelane_worker_connected", "1 while the worker holds a stream to the hub.",
                               registry=r)
        self.connections = Counter("codelane_worker_connections", "Attempts to join the hub, by result (welcomed, "
                                   "unavailable, rejected).", ["result"], registry=r)
        self.placement_time = Histogram("codelane_worker_placement_seconds", "Time to present a call's snapshot "
                                        "before it runs: a digest check, or a sync of what changed.",
                                        buckets=PLACEMENT_BUCKETS, registry=r)
        self.placements = Counter("codelane_worker_placements", "Calls placed on a snapshot, by where they ran "
                                  "(shared: the server's path; synced: the worker's copy; unavailable: not run).",
                                  ["mode"], registry=r)
        self._series: dict[tuple[str, str], Counter] = {}
        self._run_times: dict[str, Histogram] = {}

    def call_finished(self, tool: str, result: ToolResult) -> None:
        outcome = "ok" if not result.is_error else (result.error_kind or ErrorKind.TOOL_ERROR).value
        counter = self._series.get((tool, outcome))
        if counter is None:
            counter = self._series[(tool, outcome)] = self.calls.labels(tool, outcome)
        counter.inc()
        run_time = self._run_times.get(tool)
        if run_time is None:
            run_time = self._run_times[tool] = self.run_time.labels(tool)
        run_time.observe(result.run_time)


class WorkerTelemetry:
    """Metrics, health and tracing of one worker process."""

    def __init__(self, worker_id: str, metrics: WorkerMetrics, tracing: Tracing | None = None) -> None:
        self.worker_id = worker_id
        self.metrics = metrics
        self.tracing = tracing
        self.health = health.aio.HealthServicer()
        self._health_tasks: set[asyncio.Task[None]] = set()

    def set_ready(self, ready: bool) -> None:
        """SERVING while the worker holds a stream to the hub and is not draining."""
        self.metrics.connected.set(1 if ready else 0)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.get_running_loop().create_task(self.health.set("", status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    def call(self, assign: worker_pb2.Assign) -> CallObservation:
        """Observes one call, in the call's own task (its log lines then name it)."""
        log_context.call_id.set(assign.call_id)
        log_context.session_id.set(assign.session_id)
        span = None
        traceparent = assign.trace_context.traceparent
        if self.tracing is not None and traceparent:
            span = self.tracing.start(
                f"run_tool {assign.tool_name}", kind="server",
                parent=self.tracing.remote_parent(traceparent, assign.trace_context.tracestate),
                attributes={
                    "gen_ai.tool.name": assign.tool_name,
                    "gen_ai.tool.call.id": assign.call_id,
                    "gen_ai.conversation.id": assign.session_id,
                    "codelane.worker.id": self.worker_id,
                    "codelane.dispatch_id": assign.dispatch_id,
                    "codelane.attempt": assign.attempt,
                },
            )
            log_context.trace_id.set(self.tracing.trace_id(span))
        return CallObservation(self, assign.tool_name, span)


class CallObservation:
    __slots__ = ("_span", "_telemetry", "_tool")

    def __init__(self, telemetry: WorkerTelemetry, tool: str, span) -> None:
        self._telemetry = telemetry
        self._tool = tool
        self._span = span

    def end(self, result: ToolResult) -> None:
        self._telemetry.metrics.call_finished(self._tool, result)
        log.debug("call ran: %s %s in %.2f ms", self._tool, "failed" if result.is_error else "ok",
                  result.run_time * 1e3)
        span = self._span
        if span is not None:
            if result.is_error:
                kind = (result.error_kind or ErrorKind.TOOL_ERROR).value
                # The kind only: a result's text may quote files, which a trace has no business holding.
                self._telemetry.tracing.fail(span, kind, f"{self._tool} ended with {kind}")
            span.end()
