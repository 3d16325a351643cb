"""The session server's Prometheus metrics, on a registry of its own (`codelane server
--metrics-listen ADDR` serves it at /metrics).

Two kinds:
- counters and histograms updated where things happen (a call ends, a turn ends, a model request
  ends, events are committed, a gRPC call is handled). The per-call path touches only children
  bound once per (lane, tool) and cached (`CallSeries`), so a call pays a few dictionary-free
  increments and no string formatting;
- gauges of current state (workers, slots, backlog, subscribers, external tasks, admission, health),
  read from the domain objects when Prometheus scrapes (`StateCollector`), so keeping them costs
  nothing between scrapes.

Label values never come from untrusted input: a tool the model invented is `_unknown_`, models are
labelled by provider kind (openai, anthropic, scripted), never by the name a client chose.
The full list, with meanings, is in docs/deploy.md ("Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from session_server.store import MAX_READ_PAGE_CHARS
from tool_worker.merkle import WORKSPACE_MODES

# A call runs for 100 us (a cached read on a worker) up to many minutes (a build in bash).
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TURN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Up to the store's page bound, which is a bucket's edge, and past it (one event over it alone).
REPLAY_PAGE_BUCKETS = tuple(sorted({
    1024, 16 * 1024, 256 * 1024, 1024 * 1024, MAX_READ_PAGE_CHARS // 2, MAX_READ_PAGE_CHARS, 2 * MAX_READ_PAGE_CHARS,
}))
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600)

# Label of a call whose tool is not offered (the model named it): never the model's text.
UNKNOWN_TOOL = "_unknown_"
# Lane label of a call that never runs (unknown tool, bad arguments, denied, refused at capacity).
NO_LANE = "none"
OK = "ok"


def label_set(labels: Mapping[str, str]) -> str:
    """A set of labels as one label value: "gpu=true,zone=eu" (sorted), "" for none."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


class CallSeries:
    """The series one (lane, tool) updates, bound once: what a tool call touches when it ends."""

    __slots__ = ("_calls", "_labels", "_outcomes", "queue_wait", "retries", "run_time")

    def __init__(self, metrics: ServerMetrics, lane: str, tool: str) -> None:
        self._calls = metrics.tool_calls
        self._labels = (lane, tool)
        self._outcomes: dict[str, Counter] = {}
        self.queue_wait = metrics.tool_call_queue_wait.labels(lane, tool)
        self.run_time = metrics.tool_call_run_time.labels(lane, tool)
        self.retries = metrics.tool_call_retries.labels(lane, tool)

    def finished(self, outcome: str, queue_wait: float, run_time: float, begun: bool, *, ran: bool) -> None:
        """`begun`: the scheduler let the call go (it waited in the queue); `ran`: it started
        somewhere (a call that found no worker has no run time to count)."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._calls.labels(*self._labels, outcome)
        counter.inc()
        if begun:
            self.queue_wait.observe(queue_wait)
        if ran:
            self.run_time.observe(run_time)


class ServerMetrics:
    """Every metric of one session server. Methods are called on the event loop's thread."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The `_created` twin of every counter and histogram doubles the page for no use here.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        # Tool calls.
        self.tool_calls = Counter(
            "codelane_tool_calls", "Tool calls that ended, by lane, tool and outcome (ok, or the error kind).",
            ["lane", "tool", "outcome"], registry=r)
        self.tool_call_queue_wait = Histogram(
            "codelane_tool_call_queue_wait_seconds",
            "From the call's creation to the start of the attempt that produced its result.",
            ["lane", "tool"], buckets=CALL_BUCKETS, registry=r)
        self.tool_call_run_time = Histogram(
            "codelane_tool_call_run_seconds", "Run time of tool calls (the worker's own measure when one ran it).",
            ["lane", "tool"], buckets=CALL_BUCKETS, registry=r)
        self.tool_call_retries = Counter(
            "codelane_tool_call_retries",
            "Query calls dispatched again: their worker was lost, or the workspace changed before it "
            "fetched its snapshot.",
            ["lane", "tool"], registry=r)
        self._call_series: dict[tuple[str, str], CallSeries] = {}
        # Turns and model requests.
        self.turns = Counter("codelane_turns", "Turns that ended, by stop reason.", ["stop_reason"], registry=r)
        self.turn_duration = Histogram(
            "codelane_turn_duration_seconds", "Duration of turns, by stop reason.", ["stop_reason"],
            buckets=TURN_BUCKETS, registry=r)
        self.model_requests = Counter(
            "codelane_model_requests", "Model requests, by provider and status (ok, cancelled, or the error reason).",
            ["provider", "status"], registry=r)
        self.model_latency = Histogram(
            "codelane_model_request_duration_seconds", "From sending a model request to its complete response.",
            ["provider"], buckets=MODEL_BUCKETS, registry=r)
        self.model_first_token = Histogram(
            "codelane_model_time_to_first_token_seconds",
            "From sending a model request to its first streamed item (text or a complete tool call).",
            ["provider"], buckets=MODEL_BUCKETS, registry=r)
        self.model_input_tokens = Counter(
            "codelane_model_input_tokens", "Input tokens the model reported.", ["provider"], registry=r)
        self.model_output_tokens = Counter(
            "codelane_model_output_tokens", "Output tokens the model reported.", ["provider"], registry=r)
        self.model_cached_input_tokens = Counter(
            "codelane_model_cached_input_tokens", "Input tokens the model reported as read from its cache.",
            ["provider"], registry=r)
        # Events.
        self.events_appended = Counter(
            "codelane_events_appended", "Session events stored (each is stored before it is sent).", registry=r)
        self.event_commits = Counter(
            "codelane_event_commits", "Group commits of events (one per event-loop turn with events).", registry=r)
        self.event_commit_failures = Counter(
            "codelane_event_commit_failures", "Event commits that failed and were retried.", registry=r)
        self.events_delivered = Counter(
            "codelane_events_delivered", "Events handed to subscribers' streams (live or caught up).", registry=r)
        self.subscriber_catch_ups = Counter(
            "codelane_event_subscriber_catch_ups",
            "Times a subscriber fell more than its buffer (in events or bytes) behind and dropped to reading "
            "from the store (lagging subscribers are never cut off).", registry=r)
        self.event_replay_page_chars = Histogram(
            "codelane_event_replay_page_chars",
            "Characters of stored payload in each page of events read from the store for a stream (a WatchEvents "
            "replay or a subscriber catching up): at most the page bound, unless one event alone passes it.",
            buckets=REPLAY_PAGE_BUCKETS, registry=r)
        # Workers and external tasks.
        self.workers_lost = Counter(
            "codelane_workers_lost", "Workers that left the pool, by reason.", ["reason"], registry=r)
        self.external_tasks_ended = Counter(
            "codelane_external_tasks_ended", "External tasks that ended, by outcome (completed, timeout, cancelled).",
            ["outcome"], registry=r)
        self.external_task_lease_expirations = Counter(
            "codelane_external_task_lease_expirations", "Leases of external tasks that expired (the task is "
            "offered again).", registry=r)
        # Admission.
        self.admission_refusals = Counter(
            "codelane_admission_refusals", "Work refused at an operator's limit, by limit.", ["limit"], registry=r)
        # gRPC, with the names of go-grpc-prometheus, so the usual dashboards work.
        self.grpc_started = Counter(
            "grpc_server_started", "gRPC calls started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"], registry=r)
        self.grpc_handled = Counter(
            "grpc_server_handled", "gRPC calls completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=r)
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds", "Duration of gRPC calls on the server (streams: their lifetime).",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=RPC_BUCKETS, registry=r)

    def calls(self, lane: str, tool: str) -> CallSeries:
        """The bound series of (lane, tool), made on first use."""
        series = self._call_series.get((lane, tool))
        if series is None:
            series = self._call_series[(lane, tool)] = CallSeries(self, lane, tool)
        return series


# -- state read at scrape time -----------------------------------------------------------------


@dataclass(frozen=True)
class BacklogEntry:
    """Calls waiting for a worker slot that need one set of worker labels."""

    lane: str
    required_labels: str
    pending: int
    oldest_age: float


class StateSource(Protocol):
    """What `StateCollector` reads; the server provides it."""

    def worker_snapshots(self) -> Iterable[object]: ...

    def backlog(self) -> Iterable[BacklogEntry]: ...

    def subscribers(self) -> int: ...

    def external_tasks(self) -> Mapping[str, int]: ...

    def running_turns(self) -> int: ...

    def admission(self) -> Mapping[str, tuple[int, int]]: ...

    def serving(self) -> Mapping[str, bool]: ...


class StateCollector(Collector):
    """Gauges of the server's state, computed from `source` at each scrape (on the event loop)."""

    def __init__(self, source: StateSource, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        source = self._source
        workers = GaugeMetricFamily("codelane_workers", "Connected workers, by label set and state (ready, "
                                    "draining).", labels=["labels", "state"])
        slots = GaugeMetricFamily("codelane_worker_slots", "Slots of connected workers, by label set.",
                                  labels=["labels"])
        in_flight = GaugeMetricFamily("codelane_worker_calls_in_flight", "Calls outstanding on workers, by label "
                                      "set.", labels=["labels"])
        views = GaugeMetricFamily("codelane_worker_workspaces", "Workspaces the workers reported holding, by "
                                  "mode (shared, synced, syncing, unavailable).", labels=["mode"])
        # The unlabelled series are always there: a query over them reads 0, not "no data", with
        # no worker connected (what an autoscaler starting from zero workers sees).
        counts: dict[tuple[str, str], int] = {("", "ready"): 0}
        slot_sums: dict[str, int] = {"": 0}
        flight_sums: dict[str, int] = {"": 0}
        modes = dict.fromkeys(WORKSPACE_MODES, 0)
        for snap in source.worker_snapshots():
            key = label_set(snap.labels)
            state = "draining" if snap.draining else "ready"
            counts[(key, state)] = counts.get((key, state), 0) + 1
            slot_sums[key] = slot_sums.get(key, 0) + snap.slots
            flight_sums[key] = flight_sums.get(key, 0) + snap.in_flight
            for held in snap.workspaces.values():
                modes[held.mode] = modes.get(held.mode, 0) + 1
        for (key, state), n in sorted(counts.items()):
            workers.add_metric([key, state], n)
        for key, n in sorted(slot_sums.items()):
            slots.add_metric([key], n)
            in_flight.add_metric([key], flight_sums[key])
        for mode, n in modes.items():
            views.add_metric([mode], n)
        yield from (workers, slots, in_flight, views)

        pending = GaugeMetricFamily(
            "codelane_backlog_calls", "Calls waiting for a worker slot, by lane and the worker labels they need: "
            "the signal to scale workers on.", labels=["lane", "required_labels"])
        oldest = GaugeMetricFamily(
            "codelane_backlog_oldest_age_seconds", "How long the oldest call waiting for a worker slot has waited.",
            labels=["lane", "required_labels"])
        for entry in source.backlog():
            pending.add_metric([entry.lane, entry.required_labels], entry.pending)
            oldest.add_metric([entry.lane, entry.required_labels], entry.oldest_age)
        yield from (pending, oldest)

        yield GaugeMetricFamily("codelane_event_subscribers", "Live event subscriptions (SendMessage and "
                                "WatchEvents streams).", value=source.subscribers())
        tasks = GaugeMetricFamily("codelane_external_tasks", "External tasks waiting for a client, by state "
                                  "(unclaimed, claimed).", labels=["state"])
        for state, n in sorted(source.external_tasks().items()):
            tasks.add_metric([state], n)
        yield tasks
        yield GaugeMetricFamily("codelane_turns_running", "Turns running now.", value=source.running_turns())
        limit = GaugeMetricFamily("codelane_admission_limit", "Each admission limit (0: unlimited).",
                                  labels=["limit"])
        in_use = GaugeMetricFamily("codelane_admission_in_use", "What each admission limit counts, now.",
                                   labels=["limit"])
        for name, (used, bound) in sorted(source.admission().items()):
            limit.add_metric([name], bound)
            in_use.add_metric([name], used)
        yield from (limit, in_use)
        serving = GaugeMetricFamily("codelane_serving", "1 when the server takes new work (gRPC health SERVING); "
                                    "0 while its store is unavailable or it drains. By condition, with the "
                                    "overall state as condition=\"all\".", labels=["condition"])
        for condition, ok in sorted(source.serving().items()):
            serving.add_metric([condition], 1 if ok else 0)
        yield serving
