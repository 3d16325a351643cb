"""What codelane itself costs per tool call: workload T (40 small reads and 10 small greps in one
turn), with the in-process scripted model, in every placement mode side by side.

    python -m benchmarks.overhead_bench [--rounds 15] [--modes sequential,parallel-local,workers-2,...]

Each mode is its own session server process (its local workers with it), all started before the
first measurement; rounds go through the modes in turn, so a noisy moment of this shared machine
touches every mode alike. A round is one new session and two turns: T (the model asks for the 50
calls, then answers) and a text-only turn (one model request, no calls).

    overhead per call = (T's turn - 2 x the text-only turn - the tools' own time) / 50

The text-only turn stands for what a model request costs the turn (T makes two); the tools' own
time is the 50 calls run through `ToolRegistry.execute` in this process, with no server, at most
as many at once as the mode runs (one after another for sequential): what a scheduler with no cost
of its own would reach on this machine (the greps spawn ripgrep and compete for its cores),
measured in every round beside the turns, so that the subtraction pairs figures of one moment;
the overhead printed is the median over rounds. Turns are timed by the client, from sending the
message to receiving TurnFinished, so event delivery counts.

With `--baseline PYTHON` (an interpreter whose installed codelane is another checkout, e.g. the
main branch's venv), every mode is measured a second time as `<mode>@baseline`, served by that
interpreter's code, in the same rounds: a change's before and after, side by side in one run.

Every server keeps its metrics (they are always on). A mode named `...+traced` also traces: the
server and its workers send their spans over OTLP/gRPC to a receiver in this process (which
counts and drops them), so the cost of tracing shows beside the same mode untraced. `workers-N`
runs the server's default placement: T's reads, of small files, run in the server, its greps on
the workers. `workers-N+dispatch-all` sends every call to the workers (no local fallback): what a
dispatched call costs. `workers-N+local-reads` adds the placement rule `--local-query-tools read`
(every read in the server, whatever its size).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks import count
from codelane import events as ev
from codelane.client import Client
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.child_watcher import pidfd_child_watcher
from tool_worker.heap import freeze_startup_heap
from tool_worker.registry import ToolRegistry

READS = 40
GREPS = 10
READ_LINES = 50
SLOTS = 4
PARALLEL_CONCURRENCY = 16
START_TIMEOUT = 60.0
TURN_TIMEOUT = 60.0
# Issue 15's targets for the overhead per call: in the server, and through workers.
TARGET_IN_PROCESS = 150e-6
TARGET_THROUGH_WORKERS = 250e-6


@dataclass(frozen=True)
class Mode:
    name: str
    workers: int
    query_concurrency: int
    traced: bool = False
    # The placement rule: `read` runs in the server even though the workers offer it.
    local_reads: bool = False
    # No local fallback, so no placement rule either: every call on the workers.
    dispatch_all: bool = False
    # The interpreter that serves the mode (another checkout's, for `@baseline` modes).
    python: str = sys.executable

    @property
    def concurrency(self) -> int:
        return self.query_concurrency if not self.workers else min(self.query_concurrency, self.workers * SLOTS)


def make_mode(name: str) -> Mode:
    if name.endswith("+traced"):
        return dataclasses.replace(make_mode(name.removesuffix("+traced")), name=name, traced=True)
    for suffix, field_name in (("+local-reads", "local_reads"), ("+dispatch-all", "dispatch_all")):
        if name.endswith(suffix):
            mode = make_mode(name.removesuffix(suffix))
            if not mode.workers or mode.local_reads or mode.dispatch_all:
                raise argparse.ArgumentTypeError(f"{name!r}: {suffix} places calls on or off workers: only for "
                                                 "workers-N, and one of +local-reads and +dispatch-all")
            return dataclasses.replace(mode, name=name, **{field_name: True})
    if name == "sequential":
        return Mode(name, 0, 1)
    if name == "parallel-local":
        return Mode(name, 0, PARALLEL_CONCURRENCY)
    if name.startswith("workers-") and name[8:].isdigit() and int(name[8:]) > 0:
        return Mode(name, int(name[8:]), PARALLEL_CONCURRENCY)
    raise argparse.ArgumentTypeError(f"unknown mode {name!r}: sequential, parallel-local or workers-N")


def t_calls() -> list[dict]:
    calls = [{"name": "read", "arguments": {"file_path": f"src/pkg{i % 4}/mod_{i}.py"}} for i in range(READS)]
    calls += [
        {"name": "grep",
         "arguments": {"pattern": f"def func_{i}_", "path": f"src/pkg{i % 4}", "output_mode": "content"}}
        for i in range(GREPS)
    ]
    return [{"id": f"call_{i}", **c} for i, c in enumerate(calls)]


def make_workspace(root: Path) -> None:
    for i in range(READS):
        path = root / "src" / f"pkg{i % 4}" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"def func_{i}_{n}(x):" if n % 5 == 0 else f"    return x + {n}  # line {n}" for n in range(READ_LINES)
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_script(path: Path) -> None:
    script = {"responses": [
        {"text": "Workload T.", "tool_calls": t_calls()},
        {"text": "Done."},
        {"text": "Noted."},
    ]}
    path.write_text(json.dumps(script), encoding="utf-8")


async def tools_alone(workspace: Path, concurrency: int) -> tuple[float, float]:
    """Seconds of the 50 calls run through the registry in this process, no server, at most
    `concurrency` at once (1: one after another), after one pass that warms the caches: wall time,
    and this process's CPU time (rg's not, as for the servers)."""
    registry = ToolRegistry.builtin()
    calls = [(c["name"], json.dumps(c["arguments"])) for c in t_calls()]
    slots = asyncio.Semaphore(concurrency)

    async def one(name: str, arguments: str) -> None:
        async with slots:
            result = await registry.execute(name, workspace, arguments)
        if result.is_error:
            raise RuntimeError(f"{name} failed: {result.output}")

    await asyncio.gather(*(one(n, a) for n, a in calls))  # warm the caches, as a server's would be
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(n, a) for n, a in calls))
    return time.perf_counter() - started, time.process_time() - cpu_started


def overhead_verdicts(overheads: dict[str, float], modes: Sequence[Mode]) -> list[str]:
    """One line per mode judged against its target (in-process modes 150 us, modes with workers
    250 us), from the median overhead/call printed in the table. Traced modes and another
    checkout's (@baseline) are not judged: the targets are this code's, untraced."""
    lines = []
    for mode in modes:
        if mode.traced or mode.name.endswith("@baseline") or mode.name not in overheads:
            continue
        target = TARGET_THROUGH_WORKERS if mode.workers else TARGET_IN_PROCESS
        overhead = overheads[mode.name]
        where = "through workers" if mode.workers else "in-process"
        verdict = "met" if overhead <= target else "MISSED"
        lines.append(f"target: {mode.name}: overhead/call {overhead * 1e6:.0f} us, {where} at most "
                     f"{target * 1e6:.0f} us: {verdict}")
    return lines


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    # Inclusive: the quartiles of the rounds measured; the default ("exclusive") extrapolates past
    # the fastest and slowest turn when there are few (two rounds printed a p25 below both).
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


class _SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts what it is sent."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request, context):
        self.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def start_span_sink() -> tuple[grpc.aio.Server, _SpanSink, str]:
    server = grpc.aio.server()
    sink = _SpanSink()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, sink, f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its live children (a server's local
    workers): Linux /proc. On a loaded machine it moves far less than wall time does."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def run_turn(client: Client, session_id: str, text: str) -> tuple[float, list[ev.Event]]:
    session = await client.get_session(session_id)
    events: list[ev.Event] = []
    started = time.perf_counter()
    async for event in session.send(text):
        events.append(event)
    return time.perf_counter() - started, events


def check_t(events: list[ev.Event], mode: Mode) -> list[str]:
    finished = [e for e in events if isinstance(e, ev.ToolCallFinished)]
    problems = []
    if len(finished) != READS + GREPS:
        problems.append(f"{len(finished)} results, expected {READS + GREPS}")
    errors = [e for e in finished if e.result.is_error]
    if errors:
        problems.append(f"{len(errors)} errors, e.g. {errors[0].result.output[:120]!r}")
    if mode.workers:
        # Where each call ran is part of what is measured: on the workers, but for the reads the
        # placement rules keep in the server (all of T's: its files are small).
        misplaced = [e.tool_name for e in finished
                     if (e.result.worker_id == "local") != (not mode.dispatch_all and e.tool_name == "read")]
        if misplaced:
            problems.append(f"{len(misplaced)} calls ran where the mode does not place them, e.g. {misplaced[0]}")
    return problems


async def main_async(args: argparse.Namespace) -> int:
    modes: list[Mode] = args.modes
    scratch = Path(tempfile.mkdtemp(prefix="codelane-overhead-"))
    servers: dict[str, asyncio.subprocess.Process] = {}
    clients: dict[str, Client] = {}
    sink_server, sink, endpoint = await start_span_sink()
    try:
        workspace = scratch / "ws"
        make_workspace(workspace)
        script = scratch / "t.json"
        write_script(script)
        concurrencies = sorted({m.concurrency for m in modes})
        for mode in modes:
            servers[mode.name] = await asyncio.create_subprocess_exec(
                mode.python, "-m", "benchmarks.overhead_bench", "--serve", str(mode.workers),
                "--script", str(script), "--data-dir", str(scratch / f"data-{mode.name}"),
                *(["--otlp-endpoint", endpoint] if mode.traced else []),
                *(["--local-query-tools", "read"] if mode.local_reads else []),
                *(["--dispatch-all"] if mode.dispatch_all else []),
                *(["--profile", str(args.profile / mode.name)] if args.profile else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        for mode in modes:
            line = await asyncio.wait_for(servers[mode.name].stdout.readline(), START_TIMEOUT)
            words = line.decode().split()
            if len(words) != 2 or words[0] != "READY":
                raise RuntimeError(f"server for {mode.name} did not start: {line!r}")
            clients[mode.name] = Client(f"127.0.0.1:{words[1]}", timeout=10)
        turns: dict[str, list[float]] = {m.name: [] for m in modes}
        texts: dict[str, list[float]] = {m.name: [] for m in modes}
        cpus: dict[str, list[float]] = {m.name: [] for m in modes}
        overheads: dict[str, list[float]] = {m.name: [] for m in modes}
        alone: dict[int, list[float]] = {c: [] for c in concurrencies}
        alone_cpu: dict[int, list[float]] = {c: [] for c in concurrencies}
        problems: dict[str, list[str]] = {m.name: [] for m in modes}
        calls = READS + GREPS
        for round_ in range(args.warmup + args.rounds):
            # The tools alone are measured in every round, beside the turns: a loaded moment of
            # this shared machine then touches both sides of the subtraction alike.
            alone_now = {c: await tools_alone(workspace, c) for c in concurrencies}
            for mode in modes:
                client = clients[mode.name]
                session = await client.create_session(workspace, query_concurrency=mode.query_concurrency)
                cpu_before = cpu_seconds(servers[mode.name].pid)
                t_turn, events = await asyncio.wait_for(run_turn(client, session.id, "workload T"), TURN_TIMEOUT)
                cpu_used = cpu_seconds(servers[mode.name].pid) - cpu_before
                text_turn, _ = await asyncio.wait_for(run_turn(client, session.id, "and now?"), TURN_TIMEOUT)
                problems[mode.name] += check_t(events, mode)
                if round_ >= args.warmup:
                    turns[mode.name].append(t_turn)
                    texts[mode.name].append(text_turn)
                    cpus[mode.name].append(cpu_used)
                    overheads[mode.name].append((t_turn - 2 * text_turn - alone_now[mode.concurrency][0]) / calls)
            if round_ >= args.warmup:
                for concurrency, (seconds, cpu) in alone_now.items():
                    alone[concurrency].append(seconds)
                    alone_cpu[concurrency].append(cpu)
        tools_time = {c: statistics.median(times) for c, times in alone.items()}
        print(f"workload T: {READS} reads of {READ_LINES}-line files + {GREPS} greps, one turn; "
              f"{args.rounds} rounds (+{args.warmup} warm-up), medians")
        alone = ", ".join(f"{ms * 1000:.1f} ms at {c}" for c, ms in tools_time.items())
        print(f"tools alone through ToolRegistry.execute, no server (at most N at once): {alone}")
        print(f"{'mode':<26}{'T turn':>10}{'T turn p25-p75':>17}{'text turn':>11}{'ideal tools':>13}"
              f"{'overhead/call':>15}{'seq/mode':>10}{'server CPU/call':>17}{'beyond tools':>14}")
        base = statistics.median(turns[modes[0].name])
        medians: dict[str, float] = {}
        for mode in modes:
            t_turn = statistics.median(turns[mode.name])
            low, _, high = _quartiles(turns[mode.name])
            text_turn = statistics.median(texts[mode.name])
            ideal = tools_time[mode.concurrency]
            overhead = medians[mode.name] = statistics.median(overheads[mode.name])
            server_cpu = statistics.fmean(cpus[mode.name]) / calls
            beyond_tools = server_cpu - statistics.fmean(alone_cpu[mode.concurrency]) / calls
            print(f"{mode.name:<26}{t_turn * 1000:>8.1f}ms{low * 1000:>9.1f}-{high * 1000:.1f}ms"
                  f"{text_turn * 1000:>9.2f}ms{ideal * 1000:>11.2f}ms{overhead * 1e6:>12.0f} us{base / t_turn:>9.2f}x"
                  f"{server_cpu * 1e6:>14.0f} us{beyond_tools * 1e6:>11.0f} us")
        print(f"(seq/mode: {modes[0].name}'s median T turn / the mode's, the two medians printed; overhead/call: "
              f"(T turn - 2 x text turn - the tools alone in the same round) / {calls}, the median over rounds; "
              f"server CPU/call: CPU time of the server and its "
              f"workers during the T turn / {calls}, the tools' own included, rg's not, a mean over the rounds: "
              f"the kernel counts CPU time in ticks of {1000 / os.sysconf('SC_CLK_TCK'):g} ms, which one turn "
              "cannot resolve; beyond tools: that, less the tools alone's own CPU time per call, measured alike: "
              "what codelane's server and workers spend per call, which a loaded machine moves less than walls)")
        if args.baseline is not None:
            print("(@baseline: its overhead/call and beyond tools subtract the tools alone as this code runs them, so "
                  "a change to the tools themselves shows there, not in the tools alone: compare T turns, paired)")
        for mode in modes:
            before = turns.get(f"{mode.name}@baseline")
            if before:
                ratios = sorted(b / a for b, a in zip(before, turns[mode.name], strict=True))
                low, median, high = _quartiles(ratios)
                print(f"{mode.name}: baseline's T turn / this one's, paired by round: median {median:.2f}x "
                      f"(p25-p75 {low:.2f}-{high:.2f}x; medians {statistics.median(before) * 1000:.1f} ms -> "
                      f"{statistics.median(turns[mode.name]) * 1000:.1f} ms); server CPU per call "
                      f"{statistics.fmean(cpus[f'{mode.name}@baseline']) / calls * 1e6:.0f} us -> "
                      f"{statistics.fmean(cpus[mode.name]) / calls * 1e6:.0f} us")
        for mode in modes:
            twin = next((m for m in modes if m.traced and m.name == f"{mode.name}+traced"), None)
            if not mode.traced and twin is not None:
                delta = statistics.median(turns[twin.name]) - statistics.median(turns[mode.name])
                print(f"tracing on {mode.name}: {delta * 1e6 / calls:+.0f} us per call "
                      f"(T turn traced - untraced, / {calls} calls; {sink.spans} spans received in all)")
        for line in overhead_verdicts(medians, modes):
            print(line)
        for name, found in problems.items():
            if found:
                print(f"PROBLEMS in {name}: {sorted(set(found))[:5]}")
                return 1
        return 0
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for proc in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in servers.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        await sink_server.stop(None)


class _ProfiledWorkersServer(CodelaneServer):
    """A server whose local workers run under cProfile, each writing `worker-<id>.prof` to `into`
    when it exits (it drains on the server's stop)."""

    def __init__(self, config: ServerConfig, into: Path) -> None:
        super().__init__(config)
        self._profile_into = into

    def _local_worker_argv(self, worker_id: str) -> list[str]:
        argv = super()._local_worker_argv(worker_id)
        return [argv[0], "-m", "cProfile", "-o", str(self._profile_into / f"worker-{worker_id}.prof"), *argv[1:]]


async def serve(workers: int, script: Path, data_dir: Path, otlp_endpoint: str | None,
                profile: Path | None = None, local_query_tools: Sequence[str] = (), dispatch_all: bool = False) -> None:
    """One server on the script, `workers` local workers; `READY <port>` once they are connected;
    stops at EOF on stdin. With `profile` (a directory), the server and its workers run under
    cProfile from start to stop and write `server.prof` and `worker-<id>.prof` there."""
    profiler = None
    if profile is not None:
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        with pidfd_child_watcher():
            await _serve_until_stopped(workers, script, data_dir, otlp_endpoint, profile, local_query_tools,
                                       dispatch_all)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile / "server.prof")


async def _serve_until_stopped(workers: int, script: Path, data_dir: Path, otlp_endpoint: str | None,
                               profile: Path | None, local_query_tools: Sequence[str], dispatch_all: bool) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0", data_dir=data_dir, local_workers=workers, local_worker_slots=SLOTS,
        model=f"scripted:{script}", local_fallback=not dispatch_all,
        local_query_tools=list(local_query_tools), otlp_endpoint=otlp_endpoint,
    )
    server = CodelaneServer(config) if profile is None else _ProfiledWorkersServer(config, profile)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    await server.start()
    freeze_startup_heap()  # as `codelane server` does
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(server.pool.workers()) < workers:
            if time.monotonic() > deadline or stop.is_set():
                return
            await asyncio.sleep(0.05)
        print(f"READY {server.port}", flush=True)
        await stop.wait()
    finally:
        await server.stop(grace=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=count, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", type=lambda s: [make_mode(n) for n in s.split(",")],
                        default=[make_mode(n) for n in ("sequential", "parallel-local", "parallel-local+traced",
                                                         "workers-2", "workers-2+traced",
                                                         "workers-2+dispatch-all")])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--script", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--otlp-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--local-query-tools", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--dispatch-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run every server and its workers under cProfile; their profiles go to "
                             "DIR/<mode>/server.prof and worker-<id>.prof (read them with pstats)")
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also measure every mode served by this interpreter's codelane, as <mode>@baseline")
    args = parser.parse_args(argv)
    if args.baseline:
        if args.profile:
            parser.error("--profile profiles this checkout only: leave out --baseline")
        args.modes = [variant for mode in args.modes for variant in (
            mode, dataclasses.replace(mode, name=f"{mode.name}@baseline", python=args.baseline))]
    if args.serve is not None:
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(args.serve, args.script, args.data_dir, args.otlp_endpoint, args.profile,
                          args.local_query_tools, args.dispatch_all))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
