"""Harness for the operations tests: real servers and workers (in-process or subprocesses), a
real OTLP/gRPC trace receiver, /metrics scrapes, gRPC health watches.

Fixtures of the session harness (servers, clients, subprocesses, a workspace) are reused from
tests/session/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.polling import poll_until
from tests.session.conftest import (  # noqa: F401 (fixtures, registered by being imported here)
    client,
    free_port,
    make_server,
    processes,
    workspace,
)

PLUGIN = "benchmarks.plugin_tools"
WAIT = 30.0  # bound on waiting for anything (a scrape showing a figure, spans arriving)


# -- /metrics ----------------------------------------------------------------------------------


class Scrape:
    """One scrape of a /metrics page: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        """The sample with exactly these labels; `default` (or an AssertionError) when absent."""
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name}{labels} in the scrape")
        return self.samples[key]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include these."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


async def scrape(port: int) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return Scrape(response.text)


async def scrape_until(port: int, predicate: Callable[[Scrape], bool], what: str, within: float = WAIT) -> Scrape:
    """Scrapes until `predicate` holds (the figures are read as Prometheus would, repeatedly)."""
    last: list[Scrape] = []  # the latest page, for the failure message

    async def shows() -> Scrape | None:
        last[:] = [await scrape(port)]
        return last[0] if predicate(last[0]) else None

    return await poll_until(shows, what=lambda: f"a scrape showing {what}; last:\n{last[0].text[-3000:]}",
                            within=within, interval=0.05)


# -- gRPC health -------------------------------------------------------------------------------


class HealthWatch:
    """A Health.Watch stream: statuses as the server sends them."""

    def __init__(self, address: str, service: str = "") -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.seen: list[str] = []

    async def until(self, status: str, within: float = WAIT) -> None:
        async def read() -> None:
            while not self.seen or self.seen[-1] != status:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    raise AssertionError(f"the health stream ended before {status}; saw {self.seen}")
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        await asyncio.wait_for(read(), within)

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close(None)


async def health_status(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# -- OTLP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanRecord:
    service: str
    instance: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    error: bool


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    if field == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, field) if field else None


_KIND_NAMES = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver (the collector's TraceService), on 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def start(self) -> None:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(SpanRecord(
                        service=resource.get("service.name", ""),
                        instance=resource.get("service.instance.id", ""),
                        name=span.name,
                        kind=_KIND_NAMES.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        error=span.status.code == 2,
                    ))
        async with self._changed:
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate: Callable[[list[SpanRecord]], bool], what: str,
                       within: float = WAIT) -> list[SpanRecord]:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.spans))

        try:
            await asyncio.wait_for(wait(), within)
        except TimeoutError:
            names = sorted(f"{s.service}:{s.name}" for s in self.spans)
            raise AssertionError(f"spans never showed {what} within {within}s; got {names}") from None
        return self.spans


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


# -- worker processes --------------------------------------------------------------------------


class Workers:
    """`codelane worker` processes (with the plugin tools), killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, address: str, worker_id: str, *extra: str, env: dict[str, str] | None = None,
              slots: int = 1) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "tool_worker", "--connect", address, "--id", worker_id,
                "--slots", str(slots), "--tools", PLUGIN, *extra]
        with (self._tmp / f"worker-{worker_id}.out").open("wb") as out, \
                (self._tmp / f"worker-{worker_id}.err").open("wb") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def log(self, worker_id: str) -> str:
        return (self._tmp / f"worker-{worker_id}.err").read_text(errors="replace")

    async def port(self, worker_id: str, what: str) -> int:
        """The port a worker started with `--metrics-listen` or `--health-listen` HOST:0 (`what`:
        metrics or health) says it bound: the kernel picks a free one, where a port found free
        beforehand could be taken by another process before the worker bound it."""
        said = re.compile(rf"^codelane worker {what} on port (\d+)$", re.MULTILINE)
        out = self._tmp / f"worker-{worker_id}.out"

        def bound() -> int | None:
            found = said.search(out.read_text(errors="replace"))
            return int(found.group(1)) if found else None

        return await poll_until(bound, what=lambda: f"worker {worker_id}'s {what} port:\n{self.log(worker_id)}")

    def stop(self, proc: subprocess.Popen[bytes], within: float = 15.0) -> int:
        """SIGTERM (the worker drains and exits), then wait for it."""
        proc.terminate()
        return proc.wait(within)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterable[Workers]:
    workers = Workers(tmp_path)
    try:
        yield workers
    finally:
        workers.kill_all()


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
