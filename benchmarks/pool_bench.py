"""Dispatch overhead of the worker pool, measured beside raw gRPC on the same machine.

    python -m benchmarks.pool_bench [--calls 2000] [--throughput-calls 20000] [--workers 4]

Prints, in one run:
1. the round trip of a no-op tool through the hub and one worker process (p50, p99), beside a
   raw grpc.aio bidi ping-pong with the same topology (this process serves, a child process
   answers every message) and the same message types, and their ratio (target <= 1.5);
2. the throughput of no-op calls through one server with N worker processes (target >= 3000/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks import count
from codelane.transport import CHANNEL_OPTIONS, SERVER_OPTIONS
from codelane.v1 import worker_pb2, worker_pb2_grpc
from session_server import stats
from session_server.pool import QueryCall
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.merkle import SnapshotRef, snapshot_of
from tool_worker.tools.base import ToolResult
from tool_worker.wire import result_to_proto

RTT_TARGET = 1.5
THROUGHPUT_TARGET = 3000.0


def percentile(samples: list[float], pct: float) -> float:
    """Nearest rank, as the server's metrics (the index int(n x pct) took the sample one above:
    p99 of 100 round trips was the slowest)."""
    return stats.percentile(sorted(samples), pct)


# -- raw ping-pong -------------------------------------------------------------------------------


class _PingServer(worker_pb2_grpc.WorkerHubServiceServicer):
    def __init__(self) -> None:
        self.stream: asyncio.Future[tuple] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()

    async def Connect(self, request_iterator, context):
        self.stream.set_result((request_iterator, context))
        await self.done.wait()


class _RawPeer:
    """A bare bidi stream to a child process that echoes every message: the floor to compare to."""

    async def start(self) -> None:
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        self._servicer = _PingServer()
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(self._servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self._child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.pool_bench", "--echo-client", str(port)
        )
        self._requests, self._context = await self._servicer.stream
        await anext(self._requests)  # the child's first message

    async def round_trip(self, i: int, workspace: str) -> float:
        assign = worker_pb2.Assign(
            call_id=f"c{i}", attempt=1, tool_name="noop", arguments_json="{}", workspace=workspace, session_id="bench"
        )
        message = worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(assigns=[assign]))
        started = time.perf_counter()
        await self._context.write(message)
        await anext(self._requests)
        return time.perf_counter() - started

    async def stop(self) -> None:
        self._servicer.done.set()
        await self._server.stop(0.5)
        await asyncio.wait_for(self._child.wait(), 10)


async def _round_trips(calls: int, workspace: str, batch: int = 100) -> tuple[list[float], list[float]]:
    """Raw and hub round trips, measured in alternating batches so both see the same machine."""
    raw_peer = _RawPeer()
    await raw_peer.start()
    server = await _start_server(1, 1)
    raw: list[float] = []
    hub: list[float] = []
    try:
        await server.pool.dispatch(_noop(workspace, -1))  # probe the workspace once
        for first in range(0, calls, batch):
            for i in range(first, min(first + batch, calls)):
                raw.append(await raw_peer.round_trip(i, workspace))
            for i in range(first, min(first + batch, calls)):
                started = time.perf_counter()
                result = await server.pool.dispatch(_noop(workspace, i))
                hub.append(time.perf_counter() - started)
                assert not result.is_error, result.output
        return raw, hub
    finally:
        await _stop_server(server)
        await raw_peer.stop()


async def _echo_client(port: int) -> None:
    """The raw peer: answers every Assign with a Result, like a worker running nothing."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await stream.write(worker_pb2.ConnectRequest(heartbeat=worker_pb2.Heartbeat()))
        ok = result_to_proto(ToolResult(output="ok"))
        with contextlib.suppress(grpc.aio.AioRpcError):  # the benchmark ends the stream when done
            while (message := await stream.read()) is not grpc.aio.EOF:
                results = [
                    worker_pb2.CallResult(call_id=a.call_id, attempt=1, result=ok) for a in message.assignments.assigns
                ]
                await stream.write(worker_pb2.ConnectRequest(results=worker_pb2.CallResults(results=results)))


# -- through the hub ----------------------------------------------------------------------------


async def _start_server(workers: int, slots: int) -> CodelaneServer:
    config = ServerConfig(
        listen="127.0.0.1:0",
        local_workers=workers,
        local_worker_slots=slots,
        data_dir=Path(tempfile.mkdtemp(prefix="codelane-bench-")),
        local_worker_tools=["benchmarks.plugin_tools"],
    )
    server = CodelaneServer(config)
    await server.start()
    deadline = time.monotonic() + 30
    while len(server.pool.workers()) < workers:
        if time.monotonic() > deadline:
            await _stop_server(server)
            raise SystemExit("workers did not connect within 30 s")
        await asyncio.sleep(0.05)
    return server


async def _stop_server(server: CodelaneServer) -> None:
    await server.stop(1)
    shutil.rmtree(server.config.data_dir, ignore_errors=True)


def _noop(workspace: str, i: int) -> QueryCall:
    return QueryCall(
        session_id=f"s{i % 8}", call_id=f"c{i}", tool_name="noop", arguments_json="{}", workspace=workspace,
        snapshot=_snapshot(workspace),
    )


@functools.cache
def _snapshot(workspace: str) -> SnapshotRef:
    return snapshot_of(workspace)


async def _throughput(calls: int, workers: int, workspace: str) -> float:
    slots = 64
    server = await _start_server(workers, slots)
    try:
        await asyncio.gather(*(server.pool.dispatch(_noop(workspace, -i - 1)) for i in range(workers * 4)))
        window = asyncio.Semaphore(workers * slots)

        async def one(i: int) -> None:
            async with window:
                result = await server.pool.dispatch(_noop(workspace, i))
            if result.is_error:
                raise RuntimeError(result.output)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return calls / (time.perf_counter() - started)
    finally:
        await _stop_server(server)


async def run(calls: int, throughput_calls: int, workers: int, workspace: str) -> dict:
    raw, hub = await _round_trips(calls, workspace)
    rate = await _throughput(throughput_calls, workers, workspace)
    figures = {
        "raw_p50_us": statistics.median(raw) * 1e6,
        "raw_p99_us": percentile(raw, 99) * 1e6,
        "hub_p50_us": statistics.median(hub) * 1e6,
        "hub_p99_us": percentile(hub, 99) * 1e6,
        "throughput_calls_per_s": rate,
        "workers": workers,
    }
    figures["p50_ratio"] = figures["hub_p50_us"] / figures["raw_p50_us"]
    figures["p99_ratio"] = figures["hub_p99_us"] / figures["raw_p99_us"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pool_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=count, default=2000, help="round trips measured (default 2000)")
    parser.add_argument("--throughput-calls", type=count, default=20000, help="calls in the throughput run")
    parser.add_argument("--workers", type=count, default=4, help="worker processes in the throughput run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--echo-client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_client:
        asyncio.run(_echo_client(args.echo_client))
        return 0
    # A workspace of its own: the calls name a snapshot of it, and a directory that others change
    # meanwhile (the current one might be /tmp) would make workers refuse them as changed.
    scratch = Path(tempfile.mkdtemp(prefix="codelane-pool-bench-"))
    try:
        (scratch / "README.md").write_text("a workspace for no-op calls\n")
        figures = asyncio.run(run(args.calls, args.throughput_calls, args.workers, str(scratch.resolve())))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{'round trip of a no-op call':<40} {'p50 (us)':>10} {'p99 (us)':>10}")
    print(f"{'raw grpc.aio bidi ping-pong':<40} {figures['raw_p50_us']:>10.0f} {figures['raw_p99_us']:>10.0f}")
    print(f"{'through hub + 1 worker':<40} {figures['hub_p50_us']:>10.0f} {figures['hub_p99_us']:>10.0f}")
    verdict = "ok" if figures["p50_ratio"] <= RTT_TARGET else "MISSED"
    print(
        f"{'ratio hub / raw':<40} {figures['p50_ratio']:>10.2f} {figures['p99_ratio']:>10.2f}"
        f"   target p50 <= {RTT_TARGET}: {verdict}"
    )
    verdict = "ok" if figures["throughput_calls_per_s"] >= THROUGHPUT_TARGET else "MISSED"
    print(
        f"throughput, 1 server + {figures['workers']} workers: {figures['throughput_calls_per_s']:.0f} calls/s"
        f"   target >= {THROUGHPUT_TARGET:.0f}: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
