"""Smoke test of `codelane bench` on a tiny configuration: the report's structure, and that every
workload ran exactly the same calls in every mode (and on every installed peer). No timing
assertions: the figures of a run this small mean nothing, and CI machines are noisy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import bench, bench_report
from benchmarks.bench_workloads import Sizes

MODES = ("sequential", "parallel-local", "workers-2")
# Peers need the bench extra; Ray is left out here (it takes seconds to start a cluster).
PEERS = tuple(
    name for name, module in (("langgraph", "langgraph"), ("openai-agents", "agents"))
    if importlib.util.find_spec(module) is not None
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    config = bench.BenchConfig(
        workloads=("L", "H", "R", "M", "T"),
        modes=MODES,
        peers=PEERS,
        repeat=2,
        warmup=1,
        llm_latency=0.005,
        sizes=Sizes(l_mb=2, h_mb=2, m_mb=2, sleep_ms=20, r_calls=16),
        cache_dir=tmp_path_factory.mktemp("bench-cache"),
    )
    return bench.run(config, log=lambda _text: None)


def test_report_structure(report: dict) -> None:
    assert {"meta", "config", "peers", "workloads", "targets"} <= set(report)
    assert [m["name"] for m in report["config"]["modes"]] == list(MODES)
    assert set(report["workloads"]) == {"L", "H", "R", "M", "T"}
    calls = {"L": 11, "H": 8, "R": 16, "M": 11, "T": 50}
    for key, data in report["workloads"].items():
        assert data["calls"] == calls[key] == len(data["call_list"]) == len(data["lanes"])
        for mode in MODES:
            entry = data["results"][mode]
            assert entry["kind"] == "codelane"
            assert entry["runs"] == 2 and len(entry["raw"]) == 2
            for field in ("median_wall", "median_turn_wall", "speedup", "ideal_wall", "efficiency",
                          "queue_wait_per_call", "transport_per_call", "added_per_call"):
                assert isinstance(entry[field], float), (key, mode, field)
            assert entry["median_wall"] > 0
            assert entry["errors"] == 0, (key, mode, entry["problems"])
            assert entry["problems"] == [], (key, mode)
        assert data["results"]["sequential"]["speedup"] == pytest.approx(1.0)
    # Only H is all grep calls: its rg command lines are also timed without codelane.
    assert [k for k, d in report["workloads"].items() if d["rg_alone"]] == ["H"]
    assert set(report["workloads"]["H"]["rg_alone"]) == {"sequential", "concurrent"}
    assert all(t > 0 for t in report["workloads"]["H"]["rg_alone"].values())
    for target in report["targets"]:
        assert {"target", "value", "summary", "met"} <= set(target)
        if target["met"] is False:
            assert target["why"].strip("- "), target  # a missed target says why
    json.dumps(report)  # --json-out writes exactly this


def test_every_mode_ran_the_same_calls(report: dict) -> None:
    for key, data in report["workloads"].items():
        for name, entry in data["results"].items():
            assert entry["same_calls"], (key, name, entry["signatures"], data["signature"])
            assert entry["signatures"] == [data["signature"]]
            assert all(run["calls"] == data["calls"] for run in entry["raw"])


def test_codelane_keeps_read_after_write_in_order(report: dict) -> None:
    for mode in MODES:
        entry = report["workloads"]["M"]["results"][mode]
        assert entry["order_ok_runs"] == entry["order_checked_runs"] == 2, mode


def test_workers_ran_the_query_calls(report: dict) -> None:
    for key, data in report["workloads"].items():
        for run in data["results"]["workers-2"]["raw"]:
            assert set(run["workers"]) & {"local-1", "local-2"}, (key, run["workers"])
        for run in data["results"]["parallel-local"]["raw"]:
            assert run["workers"] == ["local"], (key, run["workers"])


@pytest.mark.skipif(not PEERS, reason="the bench extra (peers) is not installed")
def test_peers_ran_the_same_calls(report: dict) -> None:
    for name in PEERS:
        assert report["peers"][name]["measured"], report["peers"][name]
        for key, data in report["workloads"].items():
            entry = data["results"][name]
            assert entry["kind"] == "peer"
            assert entry["same_calls"], (name, key)


def test_outputs(report: dict, tmp_path: Path) -> None:
    table = bench_report.markdown(report)
    for key in ("L", "H", "R", "M", "T"):
        assert f"### {key} (" in table
    assert "| sequential | 1 |" in table
    assert "### Targets" in table
    assert "ripgrep alone, without codelane" in table and "ripgrep alone, all at once" in table
    # Speedup targets are judged against what this machine allows, and say so.
    assert "this machine allows" in table
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "speedup.png"
        assert bench_report.plot(report, str(png)) is None
        assert png.read_bytes().startswith(b"\x89PNG")
