"""The benchmarks that print their figures run end to end (tiny sizes, one round): a benchmark
that stopped working would otherwise only be noticed the next time someone measures."""

from __future__ import annotations

import pstats
import subprocess
import sys

import pytest

BOUND = 240


@pytest.mark.parametrize(
    ("module", "arguments", "expected"),
    [
        ("benchmarks.overhead_bench", ["--rounds", "1", "--warmup", "0", "--modes", "sequential,parallel-local"],
         ["overhead/call", "sequential", "parallel-local", "server CPU/call"]),
        # Each call where its mode places it (the benchmark fails otherwise): T's small reads in the
        # server by default, every call on the worker with +dispatch-all.
        ("benchmarks.overhead_bench", ["--rounds", "1", "--warmup", "0", "--modes",
                                       "sequential,workers-1,workers-1+dispatch-all"],
         ["workers-1 ", "workers-1+dispatch-all"]),
        ("benchmarks.overhead_bench", ["--rounds", "1", "--warmup", "0", "--modes", "sequential",
                                       "--baseline", sys.executable],
         ["sequential@baseline", "baseline's T turn / this one's, paired by round"]),
        ("benchmarks.history_bench", ["--sizes", "2,20", "--samples", "2"], ["messages", "target: flat"]),
        ("benchmarks.store_bench", ["--rounds", "1", "--turns", "2", "--pause", "0.01"],
         ["turns    checkpointer thread", "stream   SQLite, in the commits", "ms per round"]),
        ("benchmarks.events_bench", ["--events", "1200", "--subscribers", "2", "--long-turn", "1200"],
         ["fan-out:", "events/s in all", "long turn:", "gap-free and whole"]),
        ("benchmarks.read_stall_bench", ["--history-mb", "2", "--followers", "3", "--burst-mb", "5", "--rounds", "1",
                                         "--samples", "10"],
         ["loading a 2 MB history", "3 followers catching up", "shorter with the reader", "page of 1 event"]),
        ("benchmarks.registry_bench", ["--calls", "20", "--rounds", "1"],
         ["through ToolRegistry.execute:", "the tool called directly:", "the registry adds:"]),
        ("benchmarks.read_bench", ["--size-mb", "2"], ["read tool (streamed)", "whole line, then cut", "ratio"]),
        ("benchmarks.tools_bench", ["--size-mb", "1", "--repeat", "1"],
         ["grep files_with_matches", "glob **/test_*.py", "target <= 1.5"]),
        ("benchmarks.pool_bench", ["--calls", "20", "--throughput-calls", "100", "--workers", "1"],
         ["raw grpc.aio bidi ping-pong", "through hub + 1 worker", "ratio hub / raw", "calls/s"]),
        ("benchmarks.sandbox_bench", ["--runs", "2", "--walk-runs", "1"],
         ["bash -c true (2 runs each)", "git status of a 1,000-file repository", "rg, Landlock read-only",
          "workspace-write adds"]),
    ],
    ids=["overhead", "overhead-placement", "overhead-baseline", "history", "store", "events", "read-stall", "registry",
         "read", "tools", "pool", "sandbox"],
)
def test_a_benchmark_runs_and_prints_its_figures(module: str, arguments: list[str], expected: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True, timeout=BOUND)
    assert done.returncode == 0, done.stdout + done.stderr
    for text in expected:
        assert text in done.stdout, done.stdout


def test_the_overhead_benchmark_profiles_its_server_and_workers(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead_bench", "--rounds", "1", "--warmup", "0", "--modes", "workers-1",
         "--profile", str(tmp_path)],
        capture_output=True, text=True, timeout=BOUND,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stats = pstats.Stats(str(tmp_path / "workers-1" / "server.prof"))
    assert any("agent.py" in filename for filename, _, _ in stats.stats)  # the server's own code ran under it
    pstats.Stats(str(tmp_path / "workers-1" / "worker-local-1.prof"))
