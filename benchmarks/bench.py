"""`codelane bench`: when do parallel tool calls pay?

    codelane bench [--quick] [--json-out FILE] [--md-out FILE] [--plot FILE] [options]

Runs four workloads (L: 11 globs on a mid-size tree; H: 8 greps over ~200 MB; R: 16 calls with
a fixed 200 ms service time; M: reads, writes and read-after-write) in every mode (sequential;
parallel in-process; 1, 2, 4 and 8 tool-worker processes, with the server's default placement:
small reads in the server, every other Query call on a worker; `workers-N+dispatch-all` sends
every Query call to a worker) and on the peers (LangGraph ToolNode,
the OpenAI Agents SDK's function-tool executor, Ray tasks), with a mock LLM over HTTP replaying
the same script every time, so every run makes exactly the same calls. Modes and peers are
measured interleaved (round-robin, the order rotating every repetition) so a noisy machine hits
them alike. Prints a markdown table per workload and the targets; see docs/performance.md.

Peers need the bench extra: pip install -e '.[bench]'. A peer that is not installed or cannot
start is reported as not measured, never faked.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import bench_peers, bench_report
from benchmarks.bench_codelane import CodelaneHarness, Mode, RunRecord, make_modes
from benchmarks.bench_peers import PEER_NAMES, Peer
from benchmarks.bench_workloads import (
    DEFAULT_CACHE,
    WORKLOAD_KEYS,
    Sizes,
    Workload,
    bench_registry,
    build_workloads,
    calibrate,
)

FULL_MODES = ("sequential", "parallel-local", "workers-1", "workers-2", "workers-4", "workers-8")
QUICK_MODES = ("sequential", "parallel-local", "workers-2", "workers-8")
# Ray takes seconds to start a cluster and 2 s a run on R: full runs only (or --peers).
QUICK_PEERS = ("langgraph", "openai-agents")
SLOTS_PER_WORKER = 1
QUERY_CONCURRENCY = 16
LLM_LATENCY = 0.05


@dataclass
class BenchConfig:
    quick: bool = False
    workloads: Sequence[str] = WORKLOAD_KEYS
    modes: Sequence[str] = FULL_MODES
    peers: Sequence[str] = PEER_NAMES
    repeat: int = 7
    warmup: int = 1
    slots: int = SLOTS_PER_WORKER
    query_concurrency: int = QUERY_CONCURRENCY
    llm_latency: float = LLM_LATENCY
    sizes: Sizes = field(default_factory=Sizes)
    cache_dir: Path = DEFAULT_CACHE


def run(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the benchmark and returns the report (see bench_report for what it holds)."""
    if "sequential" not in config.modes:
        raise ValueError("the modes must include sequential: every speedup is against it")
    if config.repeat < 1:
        raise ValueError("--repeat must be at least 1")
    workloads = build_workloads(config.workloads, config.cache_dir, config.sizes, log)
    clock = time.perf_counter()
    calibrate(workloads)
    cpu = ", ".join(f"{w.key} {w.cpu_seconds:.2f} s" for w in workloads if w.cpu_seconds is not None)
    log(f"CPU time of the calls, alone: {cpu or '-'} (measured in {time.perf_counter() - clock:.1f} s)")
    modes = make_modes(config.modes, config.slots, config.query_concurrency)
    load_before = _load()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    clock = time.perf_counter()
    records, peer_info = asyncio.run(_measure(config, workloads, modes, log))
    report = _build_report(config, workloads, modes, records, peer_info)
    report["meta"].update(started=started, load_before=load_before, load_after=_load(),
                          seconds=round(time.perf_counter() - clock, 1))
    report["targets"] = bench_report.evaluate_targets(report)
    return report


# -- measuring ---------------------------------------------------------------------------------

Entry = Mode | Peer  # a codelane mode or a peer


async def _measure(
    config: BenchConfig, workloads: list[Workload], modes: list[Mode], log: Callable[[str], None]
) -> tuple[dict[str, dict[str, list[RunRecord]]], dict[str, dict[str, Any]]]:
    harness = CodelaneHarness(modes, config.slots, config.llm_latency, log)
    peers: list[Peer] = []
    peer_info: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, list[RunRecord]]] = {w.key: {} for w in workloads}
    try:
        # Peers first: Ray starts its cluster more reliably before this process runs gRPC threads.
        for name in config.peers:
            peer = bench_peers.make_peer(name)
            info: dict[str, Any] = {"version": peer.version, "measured": False}
            peer_info[name] = info
            if not info["version"]:
                info["reason"] = f"{peer.package} is not installed (pip install -e '.[bench]')"
                log(f"peer {name}: not measured: {info['reason']}")
                continue
            clock = time.perf_counter()
            try:
                await peer.start(workloads)
            except Exception as exc:
                info["reason"] = f"could not start: {type(exc).__name__}: {exc}"
                log(f"peer {name}: not measured: {info['reason']}")
                continue
            info["start_seconds"] = round(time.perf_counter() - clock, 2)
            peers.append(peer)
        await harness.start(workloads)
        entries: list[Entry] = [*modes, *peers]
        failed: set[str] = set()

        async def one(entry: Entry, workload: Workload) -> RunRecord | None:
            if isinstance(entry, Mode):
                return await harness.run(entry, workload)  # a failure here ends the benchmark
            if entry.name in failed:
                return None
            try:
                return await entry.run(workload)
            except Exception as exc:  # a peer that breaks is reported as not measured, never faked
                failed.add(entry.name)
                peer_info[entry.name]["reason"] = f"failed on {workload.key}: {type(exc).__name__}: {exc}"
                log(f"peer {entry.name}: {peer_info[entry.name]['reason']}")
                return None

        clock = time.perf_counter()
        for _ in range(config.warmup):
            for workload in workloads:
                for entry in entries:
                    record = await one(entry, workload)
                    if record is not None and record.problems:
                        log(f"warm-up {workload.key} {entry.name}: {'; '.join(record.problems[:3])}")
        log(f"warm-up done in {time.perf_counter() - clock:.1f} s; measuring {config.repeat} runs each")
        for rep in range(config.repeat):
            clock = time.perf_counter()
            for workload in workloads:
                shift = rep % len(entries)
                for entry in entries[shift:] + entries[:shift]:
                    record = await one(entry, workload)
                    if record is not None:
                        records[workload.key].setdefault(entry.name, []).append(record)
            log(f"run {rep + 1}/{config.repeat} done in {time.perf_counter() - clock:.1f} s")
        for peer in peers:
            peer_info[peer.name]["measured"] = peer.name not in failed
    finally:
        await harness.close()
        for peer in peers:
            try:
                await peer.close()
            except Exception as exc:
                log(f"peer {peer.name}: close failed: {exc}")
        bench_peers.shutdown()
    return records, peer_info


# -- the report --------------------------------------------------------------------------------


def _build_report(
    config: BenchConfig,
    workloads: list[Workload],
    modes: list[Mode],
    records: dict[str, dict[str, list[RunRecord]]],
    peer_info: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    registry = bench_registry()
    peer_objects = {name: bench_peers.make_peer(name) for name in peer_info}
    report: dict[str, Any] = {
        "meta": {"cpus": cpus, "python": platform.python_version(), "platform": platform.platform(terse=True)},
        "config": {
            "quick": config.quick, "repeat": config.repeat, "warmup": config.warmup, "slots": config.slots,
            "query_concurrency": config.query_concurrency, "llm_latency": config.llm_latency,
            "sizes": asdict(config.sizes), "cache_dir": str(config.cache_dir),
            "modes": [asdict(m) for m in modes], "peers": list(config.peers),
        },
        "peers": peer_info,
        "workloads": {},
    }
    for workload in workloads:
        data: dict[str, Any] = {
            "title": workload.title, "description": workload.description, "calls": len(workload.calls),
            "kind": workload.kind, "service_time": workload.service_time, "signature": workload.signature(),
            "cpu_seconds": workload.cpu_seconds, "rg_alone": workload.rg_alone,
            "lanes": [lane.value for lane in workload.lanes(registry)], "tree": workload.tree,
            "workspace": str(workload.workspace),
            "call_list": [{"tool": c.name, "arguments": c.arguments} for c in workload.calls],
            "results": {},
        }
        for mode in modes:
            runs = [r.to_json() for r in records[workload.key].get(mode.name, [])]
            if not runs:
                continue
            entry = bench_report.summarize_entry(runs, data, mode.concurrency, lanes_known=True)
            entry.update(kind="codelane", description=mode.description,
                         per_call_run_time=bench_report.per_call_medians(runs, len(workload.calls)), raw=runs)
            data["results"][mode.name] = entry
        for name, peer in peer_objects.items():
            runs = [r.to_json() for r in records[workload.key].get(name, [])]
            if not runs or not peer_info[name].get("measured"):
                continue
            entry = bench_report.summarize_entry(runs, data, peer.concurrency(workload), lanes_known=False)
            entry.update(kind="peer", description=peer.description, version=peer_info[name]["version"],
                         per_call_run_time=None, raw=runs)
            data["results"][name] = entry
        bench_report.finish_workload(data["results"], data, cpus)
        report["workloads"][workload.key] = data
    return report


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- command line ------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codelane bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="small trees, 3 runs, modes " + ",".join(QUICK_MODES) + ", peers " + ",".join(QUICK_PEERS)
                        + ": under 2 minutes")
    parser.add_argument("--workloads", type=_csv, help=f"subset of {','.join(WORKLOAD_KEYS)} (default: all)")
    parser.add_argument("--modes", type=_csv,
                        help=f"codelane modes (default {','.join(FULL_MODES)}; workers-N+dispatch-all sends every "
                        "Query call to a worker); sequential is always included")
    parser.add_argument("--peers", type=_csv, help=f"subset of {','.join(PEER_NAMES)} (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="measure codelane only")
    parser.add_argument("--repeat", type=int, help="measured runs per workload and mode (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--slots", type=int, default=SLOTS_PER_WORKER,
                        help=f"slots per worker process (default {SLOTS_PER_WORKER})")
    parser.add_argument("--query-concurrency", type=int, default=QUERY_CONCURRENCY,
                        help=f"query_concurrency of the parallel modes (default {QUERY_CONCURRENCY})")
    parser.add_argument("--llm-latency", type=float, default=LLM_LATENCY,
                        help=f"seconds the mock LLM waits before each response (default {LLM_LATENCY:g})")
    parser.add_argument("--l-size-mb", type=int, help="size of L's tree (default 40, quick 10)")
    parser.add_argument("--h-size-mb", type=int, help="size of H's tree (default 200, quick 40)")
    parser.add_argument("--sleep-ms", type=int, default=200, help="service time of R's calls (default 200)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where generated trees live (default {DEFAULT_CACHE}, or $CODELANE_BENCH_CACHE)")
    parser.add_argument("--json-out", help="write the full report (every run) as JSON")
    parser.add_argument("--md-out", help="write the markdown tables")
    parser.add_argument("--plot", help="write a PNG of speedup against workers (needs matplotlib)")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    modes = list(args.modes or (QUICK_MODES if quick else FULL_MODES))
    if "sequential" not in modes:
        modes.insert(0, "sequential")
    peers: Sequence[str] = () if args.no_peers else (args.peers or (QUICK_PEERS if quick else PEER_NAMES))
    sizes = Sizes(
        l_mb=args.l_size_mb or (10 if quick else 40),
        h_mb=args.h_size_mb or (40 if quick else 200),
        sleep_ms=args.sleep_ms,
    )
    return BenchConfig(
        quick=quick, workloads=args.workloads or WORKLOAD_KEYS, modes=modes, peers=peers,
        repeat=args.repeat or (3 if quick else 7), warmup=args.warmup, slots=args.slots,
        query_concurrency=args.query_concurrency, llm_latency=args.llm_latency, sizes=sizes,
        cache_dir=args.cache_dir,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as exc:
        print(f"codelane bench: {exc}", file=sys.stderr)
        return 2
    table = bench_report.markdown(report)
    print(table)
    if args.md_out:
        Path(args.md_out).write_text(table + "\n")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        problem = bench_report.plot(report, args.plot)
        print(f"plot: {problem}" if problem else f"plot: {args.plot}", file=sys.stderr)
    print(f"(measured in {report['meta']['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
