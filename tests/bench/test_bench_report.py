"""The report's own arithmetic: targets judged from the right figures, in the right direction, and
never from runs that failed. Pure computation on made-up reports; no benchmark runs here."""

from __future__ import annotations

from typing import Any

from benchmarks import bench_report

MODES = {"sequential": 1, "parallel-local": 16, "workers-2": 2, "workers-8": 8}


def _entry(walls: list[float], kind: str = "codelane", errors: int = 0, problems: list[str] | None = None,
           slots: int = 1) -> dict[str, Any]:
    raw = [{"wall": w, "turn_wall": w + 0.1} for w in walls]
    return {
        "kind": kind, "slots": slots, "median_wall": sorted(walls)[len(walls) // 2], "median_turn_wall": None,
        "raw": raw, "errors": errors, "same_calls": True, "problems": problems or [],
        "order_ok_runs": None, "order_checked_runs": None, "per_call_run_time": None,
        "added_per_call": None,
    }


def _report(results: dict[str, dict[str, dict[str, Any]]], peers: dict[str, Any] | None = None) -> dict[str, Any]:
    workloads = {}
    for key, entries in results.items():
        data = {"kind": "wait" if key == "R" else "cpu", "calls": 16, "service_time": 0.2, "lanes": ["query"] * 16,
                "cpu_seconds": None, "results": entries}
        bench_report.finish_workload(entries, data, cores=2)
        workloads[key] = data
    return {
        "meta": {"cpus": 2},
        "config": {"modes": [{"name": n, "workers": 0 if "workers" not in n else int(n[8:]), "concurrency": c}
                             for n, c in MODES.items()]},
        "peers": peers or {},
        "workloads": workloads,
    }


def _target(targets: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    return next(t for t in targets if t["target"].startswith(prefix))


def test_a_parallel_mode_whose_calls_failed_misses_the_target_whatever_its_speed() -> None:
    # workers-2's calls all came back as errors, fast: its speedup proves nothing.
    report = _report({"T": {
        "sequential": _entry([0.08, 0.08, 0.08]),
        "parallel-local": _entry([0.04, 0.04, 0.04], slots=16),
        "workers-2": _entry([0.01, 0.01, 0.01], errors=150, slots=2),
        "workers-8": _entry([0.06, 0.06, 0.06], slots=8),
    }})
    target = _target(bench_report.evaluate_targets(report), "T: every parallel mode")
    assert target["met"] is False
    assert "workers-2" in target["why"] and "150 error" in target["why"]


def test_a_failed_sequential_run_voids_every_speedup_target() -> None:
    report = _report({"R": {
        "sequential": _entry([3.2, 3.2, 3.2], problems=["the turn did not finish"]),
        "parallel-local": _entry([0.2, 0.2, 0.2], slots=16),
        "workers-2": _entry([1.6, 1.6, 1.6], slots=2),
        "workers-8": _entry([0.4, 0.4, 0.4], slots=8),
    }})
    target = _target(bench_report.evaluate_targets(report), "R with 8 worker slots")
    assert target["met"] is False
    assert "sequential" in target["why"] and "the turn did not finish" in target["why"]


def test_a_failed_mode_is_not_codelane_s_best_against_the_peers() -> None:
    report = _report(
        {"L": {
            "sequential": _entry([0.30, 0.30, 0.30]),
            "parallel-local": _entry([0.25, 0.25, 0.25], slots=16),
            "workers-2": _entry([0.05, 0.05, 0.05], errors=11, slots=2),
            "workers-8": _entry([0.28, 0.28, 0.28], slots=8),
            "langgraph": _entry([0.20, 0.20, 0.20], kind="peer", slots=11),
        }},
        peers={"langgraph": {"measured": True}},
    )
    target = _target(bench_report.evaluate_targets(report), "L: codelane at or under every peer")
    assert target["value"]["codelane_best_mode"] == "parallel-local"
    assert target["met"] is False  # 0.25 s against langgraph's 0.20 s


def test_healthy_runs_are_judged_as_before() -> None:
    report = _report({"T": {
        "sequential": _entry([0.08, 0.08, 0.08]),
        "parallel-local": _entry([0.04, 0.04, 0.04], slots=16),
        "workers-2": _entry([0.07, 0.07, 0.07], slots=2),
        "workers-8": _entry([0.06, 0.06, 0.06], slots=8),
    }})
    target = _target(bench_report.evaluate_targets(report), "T: every parallel mode")
    assert target["met"] is True


def test_against_the_peers_when_every_mode_failed_the_target_is_missed_not_dropped() -> None:
    broken = {name: _entry([0.01, 0.01, 0.01], errors=11, slots=slots) for name, slots in MODES.items()}
    report = _report({"M": {**broken, "langgraph": _entry([0.02, 0.02, 0.02], kind="peer", slots=11)}},
                     peers={"langgraph": {"measured": True}})
    target = _target(bench_report.evaluate_targets(report), "M: codelane at or under every peer")
    assert target["met"] is False and "11 error results" in target["why"]


def test_with_no_peer_measured_the_peer_target_is_listed_as_not_judged_with_the_reason() -> None:
    healthy = {name: _entry([0.02, 0.02, 0.02], slots=slots) for name, slots in MODES.items()}
    report = _report({"M": healthy}, peers={"langgraph": {"measured": False, "reason": "langgraph is not installed"}})
    target = _target(bench_report.evaluate_targets(report), "codelane at or under every peer")
    assert target["met"] is None and "langgraph is not installed" in target["summary"]
    assert "| n/a |" in bench_report.markdown({**report, "targets": [target], **_markdown_parts()})


def _markdown_parts() -> dict[str, Any]:
    return {"meta": {"cpus": 2, "started": "-", "python": "-", "platform": "-", "load_before": "-",
                     "load_after": "-"},
            "config": {"quick": True, "repeat": 3, "warmup": 1, "slots": 1, "query_concurrency": 16,
                       "llm_latency": 0.05, "modes": []},
            "workloads": {}}
