"""Figures, targets, and the three outputs of `codelane bench`: JSON, a markdown table, a PNG plot.

Definitions (also in docs/performance.md):
- wall: the median over runs of the tool phase (see bench_codelane / bench_peers);
- speedup: wall of `sequential` / wall of the mode, the two medians printed beside it;
- paired speedup: the median over repetitions of (wall of `sequential` / wall of the mode) in the
  same repetition, so that the load drift of a shared machine cancels out; targets are judged
  on it;
- ceiling: sequential's wall / the mode's ideal wall: the most any scheduler could gain over
  sequential on this machine; a speedup target beyond it is judged as a share of it;
- ideal: for R, ceil(N / slots) x service time; for L, H and M, the larger of (a) the calls' run
  times measured in `sequential`, divided perfectly over min(slots, cores), Query runs in
  parallel and Execute calls one at a time, in model order, and (b) the CPU seconds the calls
  need (measured alone, rg included) / cores: the best this machine could do if the work split
  perfectly and cost nothing to dispatch;
- efficiency: ideal / wall;
- queue wait/call: mean time a call waited for a free slot (ToolCallFinished.queue_wait);
- transport/call: median of (finished - started - run_time): the dispatch round trip;
- added/call: (wall - the makespan of the run's own measured run times list-scheduled on the
  mode's slots) / N: the wall time the runtime added, per call, beyond running the tools.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from typing import Any

L_RATIO_TARGET = 1.05
R_SPEEDUP_TARGET = 7.0
R_TARGET_SLOTS = 8
H_SPEEDUP_TARGET = 1.6
T_SPEEDUP_TARGET = 1.6
# A speedup target the machine cannot reach is met at this share of what it can (its ceiling).
CEILING_SHARE = 0.9


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def makespan(times: Sequence[float], slots: int) -> float:
    """Greedy list scheduling of `times`, in order, on `slots` parallel slots."""
    if not times:
        return 0.0
    free = [0.0] * max(1, min(slots, len(times)))
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free)


def segmented(times: Sequence[float], lanes: Sequence[str], slots: int) -> float:
    """Makespan with codelane's rule: runs of Query calls in parallel, Execute calls alone."""
    total, run = 0.0, []
    for t, lane in zip(times, lanes, strict=False):
        if lane == "execute":
            total += makespan(run, slots) + t
            run = []
        else:
            run.append(t)
    return total + makespan(run, slots)


def ideal_wall(
    workload: dict[str, Any], slots: int, cores: int, sequential_times: Sequence[float] | None
) -> float | None:
    n = workload["calls"]
    if workload["kind"] == "wait":
        return math.ceil(n / max(1, slots)) * workload["service_time"]
    if not sequential_times:
        return None
    width = max(1, min(slots, cores))
    total, run = 0.0, []
    for t, lane in zip(sequential_times, workload["lanes"], strict=False):
        if lane == "execute":
            total += _perfect(run, width) + t
            run = []
        else:
            run.append(t)
    total += _perfect(run, width)
    # No schedule beats the CPU the calls need, spread over every core.
    cpu_floor = (workload.get("cpu_seconds") or 0.0) / cores
    return max(total, cpu_floor)


def _perfect(times: Sequence[float], width: int) -> float:
    return max(max(times), sum(times) / width) if times else 0.0


def summarize_entry(
    runs: list[dict[str, Any]], workload: dict[str, Any], slots: int, lanes_known: bool
) -> dict[str, Any]:
    """The figures of one (workload, mode or peer) from its runs."""
    walls = [r["wall"] for r in runs]
    turns = [r["turn_wall"] for r in runs if r.get("turn_wall") is not None]
    queue = [q for r in runs for q in r["queue_waits"]]
    transports = [t for r in runs if r.get("transports") is not None for t in r["transports"]]
    added = []
    for r in runs:
        if not r["calls"]:
            continue
        lanes = workload["lanes"] if lanes_known else ["query"] * len(r["run_times"])
        added.append((r["wall"] - segmented(r["run_times"], lanes, slots)) / r["calls"])
    signatures = sorted({r["signature"] for r in runs})
    order = [r["order_ok"] for r in runs if r["order_ok"] is not None]
    return {
        "runs": len(runs),
        "slots": slots,
        "median_wall": _median(walls),
        "min_wall": min(walls) if walls else None,
        "max_wall": max(walls) if walls else None,
        "median_turn_wall": _median(turns),
        "median_after_response": _median([r["after_response"] for r in runs if r.get("after_response") is not None]),
        "median_head_start": _median([r["head_start"] for r in runs if r.get("head_start") is not None]),
        "queue_wait_per_call": statistics.fmean(queue) if queue else None,
        # What a benchmark that sums queue waits and calls it "overhead" would report, per run.
        "summed_queue_wait_per_run": sum(queue) / len(runs) if runs else None,
        "transport_per_call": _median(transports),
        "added_per_call": _median(added),
        "median_run_time": _median([t for r in runs for t in r["run_times"]]),
        "signatures": signatures,
        "same_calls": signatures == [workload["signature"]] and all(r["calls"] == workload["calls"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "order_ok_runs": sum(order) if order else None,
        "order_checked_runs": len(order) if order else None,
        "problems": sorted({p for r in runs for p in r["problems"]})[:10],
    }


def finish_workload(entries: dict[str, dict[str, Any]], workload: dict[str, Any], cores: int) -> None:
    """Adds speedup, ideal and efficiency to every entry, against `sequential`."""
    sequential = entries.get("sequential")
    seq_wall = sequential["median_wall"] if sequential else None
    seq_turn = sequential["median_turn_wall"] if sequential else None
    seq_times = None
    if sequential and sequential["per_call_run_time"]:
        seq_times = sequential["per_call_run_time"]
    for entry in entries.values():
        wall = entry["median_wall"]
        entry["speedup_of_medians"] = seq_wall / wall if seq_wall and wall else None
        entry["speedup"] = paired_ratio(sequential, entry, "wall") if sequential else None
        turn = entry["median_turn_wall"]
        entry["turn_speedup"] = paired_ratio(sequential, entry, "turn_wall") if sequential and turn else None
        entry["turn_speedup_of_medians"] = seq_turn / turn if seq_turn and turn else None
        ideal = ideal_wall(workload, entry["slots"], cores, seq_times)
        entry["ideal_wall"] = ideal
        entry["efficiency"] = ideal / wall if ideal and wall else None


def paired_ratio(numerator: dict[str, Any], denominator: dict[str, Any], field: str) -> float | None:
    """Median over repetitions of numerator[field] / denominator[field], run i against run i:
    both ran in the same repetition, a few seconds apart, so the load drift of a shared machine
    cancels out (the medians of the two alone do not pair them)."""
    ratios = [
        a[field] / b[field]
        for a, b in zip(numerator["raw"], denominator["raw"], strict=False)
        if a.get(field) and b.get(field)
    ]
    return statistics.median(ratios) if ratios else None


def per_call_medians(runs: list[dict[str, Any]], calls: int) -> list[float] | None:
    """Median run time of each call (by position), over runs that ran every call."""
    complete = [r["run_times"] for r in runs if len(r["run_times"]) == calls]
    if not complete:
        return None
    return [statistics.median(times[i] for times in complete) for i in range(calls)]


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    workloads = report["workloads"]
    codelane_modes = [m["name"] for m in report["config"]["modes"]]
    # "Parallel": modes that run more than one call at once (workers-1 with one slot does not).
    parallel = [m["name"] for m in report["config"]["modes"] if m["concurrency"] > 1]

    def entry(key: str, name: str) -> dict[str, Any] | None:
        return workloads.get(key, {}).get("results", {}).get(name)

    def judged(key: str, modes: Sequence[str], target: dict[str, Any]) -> dict[str, Any]:
        """The target, missed if any run it rests on failed (sequential's included: every speedup
        is against it): a mode whose calls came back as errors is fast and proves nothing."""
        failed = {m: why for m in ("sequential", *modes) if (why := _failure(entry(key, m)))}
        if failed:
            before = f"; and: {target['why']}" if target["met"] is False and target.get("why") else ""
            target.update(met=False, failed=failed, why="runs failed, so their figures prove nothing: "
                          + "; ".join(f"{m}: {why}" for m, why in failed.items()) + before)
        return target

    if "L" in workloads and parallel:
        ratios = {m: 1 / e["speedup"] for m in parallel if (e := entry("L", m)) and e["speedup"]}
        if ratios:
            worst = max(ratios, key=ratios.__getitem__)
            best = min(ratios, key=ratios.__getitem__)
            targets.append(judged("L", parallel, {
                "target": f"L: parallel / sequential wall <= {L_RATIO_TARGET} (every mode with > 1 slot)",
                "value": ratios,
                "summary": f"worst {worst} {ratios[worst]:.2f}, best {best} {ratios[best]:.2f}",
                "met": ratios[worst] <= L_RATIO_TARGET,
                "why": f"{worst} took {ratios[worst]:.2f} of sequential's wall (paired), over {L_RATIO_TARGET}",
            }))
    if "R" in workloads:
        eight = [m["name"] for m in report["config"]["modes"]
                 if m["workers"] and m["concurrency"] == R_TARGET_SLOTS]
        speedups = {m: e["speedup"] for m in eight if (e := entry("R", m)) and e["speedup"]}
        if speedups:
            best = max(speedups, key=speedups.__getitem__)
            targets.append(judged("R", eight, {
                "target": f"R with {R_TARGET_SLOTS} worker slots: >= {R_SPEEDUP_TARGET:g}x faster than sequential",
                "value": speedups,
                "summary": f"{best}: {speedups[best]:.2f}x",
                "met": speedups[best] >= R_SPEEDUP_TARGET,
                "why": f"{best} reached {speedups[best]:.2f}x, under {R_SPEEDUP_TARGET:g}x: "
                       f"{_pct(_efficiency(entry('R', best)))} of its ideal wall",
            }))
        else:
            targets.append({"target": f"R with {R_TARGET_SLOTS} worker slots", "value": None,
                            "summary": f"no mode with {R_TARGET_SLOTS} worker slots ran", "met": None})
    if "H" in workloads and parallel:
        speedups = {m: e["speedup"] for m in parallel if (e := entry("H", m)) and e["speedup"]}
        if speedups:
            best = max(speedups, key=speedups.__getitem__)
            targets.append(judged("H", parallel, _ceiling_target(
                f"H: >= {H_SPEEDUP_TARGET:g}x with {report['meta']['cpus']} cores", best, speedups,
                entry("H", "sequential"), entry("H", best), H_SPEEDUP_TARGET, workloads["H"].get("rg_alone"),
            )))
    if "T" in workloads and parallel:
        speedups = {m: e["speedup"] for m in parallel if (e := entry("T", m)) and e["speedup"]}
        if speedups:
            worst = min(speedups, key=speedups.__getitem__)
            targets.append(judged("T", parallel, {
                "target": "T: every parallel mode, workers included, at least as fast as sequential (paired)",
                "value": speedups,
                "summary": ", ".join(f"{m} {v:.2f}x" for m, v in speedups.items()) + f"; slowest {worst}",
                "met": speedups[worst] >= 1.0,
                "why": _t_why(worst, speedups[worst], entry("T", "sequential"), entry("T", worst)),
            }))
            if "parallel-local" in speedups:
                targets.append(judged("T", ["parallel-local"], _ceiling_target(
                    f"T: parallel in-process >= {T_SPEEDUP_TARGET:g}x sequential", "parallel-local", speedups,
                    entry("T", "sequential"), entry("T", "parallel-local"), T_SPEEDUP_TARGET, None,
                )))
    peers = [p for p, info in report["peers"].items() if info.get("measured")]
    if not peers:
        # Not judged, and said so: a target left out of the table would read as none missed.
        reasons = "; ".join(f"{p}: {info.get('reason', '?')}" for p, info in report["peers"].items())
        targets.append({"target": "codelane at or under every peer's wall time (M: and correct in every run)",
                        "value": None, "met": None,
                        "summary": "not judged: no peer was measured" + (f" ({reasons})" if reasons else
                                                                          " (--no-peers)")})
    for key, data in workloads.items():
        results = data["results"]
        # A mode whose runs failed is not codelane's best, however fast its errors came back.
        mine = {m: results[m]["median_wall"] for m in codelane_modes
                if m in results and results[m]["median_wall"] and not _failure(results[m])}
        if not peers:
            continue
        if not mine:
            failed = {m: why for m in codelane_modes if (why := _failure(results.get(m)))}
            if failed:
                targets.append({
                    "target": f"{key}: codelane at or under every peer's wall time", "value": None,
                    "summary": "no codelane mode ran without failing", "met": False, "failed": failed,
                    "why": "; ".join(f"{m}: {why}" for m, why in failed.items()),
                })
            continue
        best = min(mine, key=mine.__getitem__)
        theirs = {p: results[p]["median_wall"] for p in peers if p in results and results[p]["median_wall"]}
        if not theirs:
            continue
        # codelane's wall / the peer's, paired by repetition: <= 1 means at or under.
        ratios = {p: paired_ratio(results[best], results[p], "wall") for p in theirs}
        correct = _correct_runs(results[best])
        targets.append({
            "target": f"{key}: codelane at or under every peer's wall time"
            + (", correct in every run" if correct is not None else ""),
            "value": {"codelane_best_mode": best, "codelane_wall": mine[best], "peers": theirs,
                      "paired_ratios": ratios},
            "summary": f"codelane {best} {mine[best] * 1000:.1f} ms"
            + (f" ({correct})" if correct is not None else "") + " vs "
            + ", ".join(
                f"{p} {w * 1000:.1f} ms ({_correct_runs(results[p]) or 'order not checked'}): "
                f"codelane/{p} x{mine[best] / w:.2f} of these medians, x{ratios[p]:.2f} paired"
                if ratios[p] is not None else f"{p} {w * 1000:.1f} ms"
                for p, w in theirs.items()
            ),
            "met": all(r is not None and r <= 1.0 for r in ratios.values())
            and (correct is None or results[best]["order_ok_runs"] == results[best]["order_checked_runs"]),
            "why": _peers_why(best, results, ratios),
        })
    return targets


def _failure(entry: dict[str, Any] | None) -> str | None:
    """Why a codelane mode's runs cannot count for a target (None: they can): error results, other
    calls than the workload's, or problems the runs reported (a turn that did not finish, a call
    that ran where the mode does not place it). Peers are judged by their walls as they are."""
    if entry is None or entry.get("kind") != "codelane":
        return None
    reasons = []
    if entry.get("errors"):
        reasons.append(f"{entry['errors']} error results")
    if not entry.get("same_calls", True):
        reasons.append("not the workload's calls")
    reasons += entry.get("problems") or []
    return ", ".join(reasons[:3]) or None


def _correct_runs(entry: dict[str, Any]) -> str | None:
    if entry.get("order_checked_runs") is None:
        return None
    return f"read-after-write correct in {entry['order_ok_runs']}/{entry['order_checked_runs']} runs"


def _ceiling_target(
    name: str,
    mode: str,
    speedups: dict[str, float],
    sequential: dict[str, Any] | None,
    chosen: dict[str, Any] | None,
    target: float,
    rg_alone: dict[str, float] | None,
) -> dict[str, Any]:
    """A speedup target judged against this machine's ceiling for the mode: met at `target`, or
    at CEILING_SHARE of the ceiling where the ceiling is lower than the target allows."""
    speedup = speedups[mode]
    ceiling = None
    if sequential and chosen and sequential["median_wall"] and chosen.get("ideal_wall"):
        ceiling = sequential["median_wall"] / chosen["ideal_wall"]
    needed = target if ceiling is None else min(target, CEILING_SHARE * ceiling)
    summary = f"{mode}: {speedup:.2f}x (paired)"
    if ceiling is not None:
        summary += (f", {speedup / ceiling:.0%} of the {ceiling:.2f}x this machine allows; needed "
                    f"{needed:.2f}x ({target:g}x, or {CEILING_SHARE:.0%} of the ceiling where that is lower)")
    if rg_alone:
        summary += (f"; ripgrep alone, all at once against one after another: "
                    f"{rg_alone['sequential'] / rg_alone['concurrent']:.2f}x")
    why = f"{mode} reached {speedup:.2f}x, under the {needed:.2f}x needed"
    if ceiling is not None:
        why += f" ({speedup / ceiling:.0%} of this machine's {ceiling:.2f}x ceiling, under {CEILING_SHARE:.0%})"
    return {"target": name, "value": speedups, "ceiling": ceiling, "needed": needed, "summary": summary,
            "met": speedup >= needed, "why": why}


def _efficiency(entry: dict[str, Any] | None) -> float | None:
    return None if not entry else entry.get("efficiency")


def _t_why(mode: str, speedup: float, sequential: dict[str, Any] | None, slowest: dict[str, Any] | None) -> str:
    """Why a parallel mode lost to sequential on T: what it added per call, beside sequential."""
    why = f"{mode} ran at {speedup:.2f}x of sequential (paired)"
    added = [(name, e.get("added_per_call")) for name, e in (("sequential", sequential), (mode, slowest)) if e]
    if all(value is not None for _, value in added) and len(added) == 2:
        why += "; added per call beyond the tools: " + ", ".join(f"{n} {v * 1000:.2f} ms" for n, v in added)
    return why


def _peers_why(best: str, results: dict[str, Any], ratios: dict[str, float | None]) -> str:
    """Which peers were faster, and whether their runs were correct."""
    faster = [p for p, r in ratios.items() if r is None or r > 1.0]
    parts = []
    for p in faster:
        ratio = ratios[p]
        correct = _correct_runs(results[p])
        parts.append((f"{p}: not paired" if ratio is None else f"codelane took {ratio:.2f}x {p}'s wall (paired)")
                     + (f", {correct}" if correct is not None else ""))
    if results[best].get("order_checked_runs") is not None and \
            results[best]["order_ok_runs"] != results[best]["order_checked_runs"]:
        parts.append(f"codelane {best} itself: {_correct_runs(results[best])}")
    return "; ".join(parts) or "-"


# -- markdown ----------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 1000:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    meta, config = report["meta"], report["config"]
    lines = [
        f"## codelane bench ({'quick' if config['quick'] else 'full'} run, {meta['started']})",
        "",
        f"{meta['cpus']} cores, Python {meta['python']}, {meta['platform']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after. {config['repeat']} measured runs per "
        f"workload and mode after {config['warmup']} warm-up, interleaved (round-robin, rotating order). "
        f"Workers have {config['slots']} slot(s) each; parallel modes use query_concurrency="
        f"{config['query_concurrency']}. Mock LLM: {config['llm_latency'] * 1000:g} ms before each response, "
        "2 responses per turn.",
        "",
    ]
    for key, data in report["workloads"].items():
        tree = data.get("tree") or {}
        where = f" ({tree['files']} files, {tree['mb']} MB)" if tree else ""
        lines += [f"### {key} ({data['title']}): {data['description']}{where}", ""]
        sequential = data["results"].get("sequential")
        if data.get("cpu_seconds") and sequential and sequential["median_wall"]:
            floor = data["cpu_seconds"] / meta["cpus"]
            lines += [
                f"CPU time of the calls (alone, in-process, rg included): {data['cpu_seconds']:.2f} s, so no schedule "
                f"on {meta['cpus']} cores beats about {floor * 1000:.0f} ms: at most about "
                f"{sequential['median_wall'] / floor:.2f}x over sequential's median (an estimate: CPU time "
                "itself varies with the machine's load).",
                "",
            ]
        if rg := data.get("rg_alone"):
            lines += [
                f"ripgrep alone, without codelane (the calls' own rg command lines, output read as the tool "
                f"reads it): {rg['sequential'] * 1000:.0f} ms one after another, {rg['concurrent'] * 1000:.0f} ms "
                f"all at once: {rg['sequential'] / rg['concurrent']:.2f}x. rg searches with one thread per core, "
                "so one search already keeps every core busy and side by side they can only share them.",
                "",
            ]
        lines += [
            "| mode | slots | wall ms | turn ms | speedup | paired speedup | ideal ms | efficiency "
            "| queue wait/call ms | transport/call ms | added/call ms | same calls | errors | read-after-write |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
        ]
        for name, e in data["results"].items():
            label = name if e["kind"] == "codelane" else f"peer: {name}"
            order = "-" if e["order_checked_runs"] is None else f"{e['order_ok_runs']}/{e['order_checked_runs']}"
            lines.append(
                f"| {label} | {e['slots']} | {_ms(e['median_wall'])} | {_ms(e['median_turn_wall'], 0)} "
                f"| {_x(e['speedup_of_medians'])} | {_x(e['speedup'])} | {_ms(e['ideal_wall'])} "
                f"| {_pct(e['efficiency'])} "
                f"| {_ms(e['queue_wait_per_call'], 2)} | {_ms(e['transport_per_call'], 2)} "
                f"| {_ms(e['added_per_call'], 2)} | {'yes' if e['same_calls'] else 'NO'} | {e['errors']} | {order} |"
            )
        lines.append("")
    r_data = report["workloads"].get("R")
    if r_data:
        lines += [
            "### Queue wait is not overhead (R)",
            "",
            "Summing every call's queue wait, as a benchmark blaming \"queue overhead\" would, against what the "
            "runtime actually added:",
            "",
            "| mode | wall s | summed queue wait per run s | transport/call ms | added/call ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, e in r_data["results"].items():
            if e["kind"] != "codelane":
                continue
            summed = e["summed_queue_wait_per_run"]
            lines.append(
                f"| {name} | {_s(e['median_wall'])} | {_s(summed)} | {_ms(e['transport_per_call'], 2)} "
                f"| {_ms(e['added_per_call'], 2)} |"
            )
        lines.append("")
    unavailable = {p: i for p, i in report["peers"].items() if not i.get("measured")}
    if unavailable:
        lines.append("Peers not measured: " + "; ".join(f"{p}: {i.get('reason', '?')}" for p, i in unavailable.items()))
        lines.append("")
    if report["targets"]:
        lines += ["### Targets", "", "| target | measured | met | why not |", "| --- | --- | --- | --- |"]
        for t in report["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            why = t.get("why", "-") if t["met"] is False else ""
            lines.append(f"| {t['target']} | {t['summary']} | {met} | {why} |")
        lines.append("")
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: str) -> str | None:
    """Speedup against sequential by number of workers, one line per workload. Returns an error
    text instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    config, cores = report["config"], report["meta"]["cpus"]
    workers = sorted(m["workers"] for m in config["modes"] if m["workers"])
    slots = config["slots"]
    local_x = 0.5
    markers = {"L": "o", "H": "s", "R": "^", "M": "D", "T": "v"}
    colors = {"L": "tab:blue", "H": "tab:orange", "R": "tab:green", "M": "tab:red", "T": "tab:purple"}
    waiting = [k for k, d in report["workloads"].items() if d["kind"] == "wait"]
    cpu_bound = [k for k, d in report["workloads"].items() if d["kind"] != "wait"]
    panels = [p for p in ((waiting, "tools that wait (R)"), (cpu_bound, "CPU-bound tools (L, H, M, T)")) if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=110, squeeze=False)
    for ax, (keys, title) in zip(axes[0], panels, strict=True):
        top = 2.0
        for key in keys:
            data = report["workloads"][key]
            results = data["results"]
            xs = [n for n in workers if f"workers-{n}" in results]
            ys = [results[f"workers-{n}"]["speedup"] or 0 for n in xs]
            color, marker = colors.get(key), markers.get(key, "o")
            ax.plot(xs, ys, marker=marker, color=color, label=f"{key} ({data['title']})")
            local = results.get("parallel-local")
            if local and local["speedup"]:
                ax.plot([local_x], [local["speedup"]], marker=marker, color=color, fillstyle="none",
                        linestyle="none")
                top = max(top, local["speedup"])
            top = max(top, *ys) if ys else top
            if data["kind"] == "wait":
                for x, y in [*zip(xs, ys, strict=True), *([(local_x, local["speedup"])] if local else [])]:
                    ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(7, -4), fontsize=7,
                                color=color)
                calls = data["calls"]
                ax.plot(workers, [min(n * slots, calls) for n in workers], "k--", linewidth=0.8,
                        label="ideal: slots")
        ax.axhline(1, color="grey", linewidth=0.6)
        if keys == cpu_bound:
            ax.axhline(cores, color="grey", linestyle=":", linewidth=0.9, label=f"{cores} cores")
            ax.set_ylim(0, max(cores + 0.5, top * 1.15))
        else:
            ax.set_yscale("log", base=2)
            ticks = [t for t in (1, 2, 4, 8, 16, 32) if t <= top * 1.5]
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"{t:g}x" for t in ticks])
            ax.set_ylim(0.7, top * 1.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks([local_x, *workers])
        ax.set_xticklabels(["in-\nprocess", *[str(n) for n in workers]])
        ax.set_xlabel(f"tool-worker processes ({slots} slot{'s' if slots > 1 else ''} each)")
        ax.set_ylabel("speedup vs sequential (tool phase)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if keys == waiting else "upper left")
    fig.suptitle(f"codelane bench: speedup against workers ({cores} cores, median of {config['repeat']} runs; "
                 "hollow: in-process parallel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
