"""The small benchmarks' printed figures agree with one another: a p50 column and the difference
printed beside it come from the same median, percentiles stay within the samples. Pure
computation on made-up samples; no benchmark runs here."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from benchmarks import events_bench, overhead_bench, pool_bench, sandbox_bench, workspace_bench


def _row(output: str, name: str) -> list[str]:
    return next(line for line in output.splitlines() if line.strip().startswith(name)).split()


def test_the_sandbox_bench_p50_column_is_the_median_its_added_column_subtracts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Four samples each: the median is between the middle two, not the upper one.
    sandbox_bench._print("bash -c true", {"unconfined": [1.0, 2.0, 3.0, 10.0], "sandboxed": [4.0, 5.0, 7.0, 20.0]},
                         "unconfined")
    output = capsys.readouterr().out
    base, sandboxed = _row(output, "unconfined"), _row(output, "sandboxed")
    assert base[1] == "2.50" and sandboxed[1] == "6.00"
    # The added figure is the difference of the two p50s printed.
    assert sandboxed[3] == "+3.50"


@pytest.mark.parametrize("values", [[0.050, 0.060], [0.050, 0.052, 0.070], [0.04, 0.05, 0.06, 0.09, 0.30]])
def test_the_overhead_bench_p25_p75_lie_within_the_measured_turns(values: list[float]) -> None:
    low, median, high = overhead_bench._quartiles(values)
    assert min(values) <= low <= median <= high <= max(values)
    assert median == statistics.median(values)


def test_the_overhead_bench_judges_each_mode_against_its_own_target() -> None:
    modes = [overhead_bench.make_mode(n) for n in ("sequential", "parallel-local", "parallel-local+traced",
                                                    "workers-2", "workers-2+dispatch-all")]
    lines = overhead_bench.overhead_verdicts(
        {"sequential": 149e-6, "parallel-local": 151e-6, "parallel-local+traced": 900e-6,
         "workers-2": 240e-6, "workers-2+dispatch-all": 251e-6}, modes)
    assert lines == [
        "target: sequential: overhead/call 149 us, in-process at most 150 us: met",
        "target: parallel-local: overhead/call 151 us, in-process at most 150 us: MISSED",
        "target: workers-2: overhead/call 240 us, through workers at most 250 us: met",
        "target: workers-2+dispatch-all: overhead/call 251 us, through workers at most 250 us: MISSED",
    ]


def test_the_workspace_bench_judges_each_figure() -> None:
    lines = workspace_bench.figures_table(sync=1.6, tar=1.0, watched_ms=0.3, full_ms=90.0, synced_ms=14.0,
                                          shared_ms=4.0)
    assert lines[1].split()[-4:] == ["1.60x", "<=", "1.5x", "MISSED"]
    assert lines[2].split()[-3:] == ["<=", "50", "met"]  # the watched snapshot, not the stat-everything one
    assert lines[3].split()[-3:] == ["<=", "+10", "met"]  # 10.00 ms more: at most 10


@pytest.mark.parametrize(
    ("sequences", "finished", "cut", "expected"),
    [
        ([1, 2, 3], True, None, None),
        ([1, 2, 3], False, "RESOURCE_EXHAUSTED: the reader fell behind", "cut after 3 events (RESOURCE_EXHAUSTED"),
        ([1, 2, 4], True, None, "sequence 4 where 3 was due"),
        ([1, 2, 3], False, None, "ended after 3 events, before TurnFinished"),
    ],
)
def test_the_events_bench_long_turn_is_whole_only_when_its_own_stream_carried_all_of_it(
    sequences: list[int], finished: bool, cut: str | None, expected: str | None
) -> None:
    problem = events_bench.long_turn_problem(sequences, finished, cut)
    assert problem == expected if expected is None else expected in problem


def test_the_pool_bench_p99_is_the_nearest_rank_not_the_sample_above() -> None:
    samples = [float(i) for i in range(100, 0, -1)]  # 1 to 100, unordered
    assert pool_bench.percentile(samples, 99) == 99.0
    assert pool_bench.percentile(samples, 50) == 50.0



@pytest.mark.parametrize(
    ("module", "arguments"),
    [(overhead_bench, ["--rounds", "0"]), (pool_bench, ["--calls", "0"]), (pool_bench, ["--calls", "x"]),
     (events_bench, ["--events", "-3"])],
)
def test_counts_of_nothing_are_refused_before_anything_runs(
    module: Any, arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `--rounds 0` crashed with statistics' StatisticsError after starting the servers.
    with pytest.raises(SystemExit) as exited:
        module.main(arguments)
    assert exited.value.code == 2
    assert f"argument {arguments[0]}:" in capsys.readouterr().err
