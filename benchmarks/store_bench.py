"""What committing events costs the thread that writes (the server's event loop), with the store's
checkpointer thread and with SQLite's own checkpoints in the commits, side by side.

    python -m benchmarks.store_bench [--rounds 3] [--turns 40] [--pause 0.05]

Two patterns, each run in alternating rounds with and without the checkpointer on a new store
(in a temporary directory: the machine's disk):

- turns: a burst of 15 commits of 8 ToolCallFinished events of 12 KB each (a turn's results, as
  the event log's group commit writes them), then `--pause` seconds (the model's next step);
- stream: commits of 8 events of 2 KB back to back, with no pause (a writer that never waits).

Printed per pattern and variant: a commit's p50, p99 and max, and the commits' total time per
round, the time the event loop stood still for them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks import count
from session_server.events import StoredEvent, ToolCallFinished
from session_server.stats import percentile
from session_server.store import CHECKPOINT_DELAY, SessionRecord, Store
from tool_worker.tools.base import ToolResult

EVENTS_PER_COMMIT = 8
COMMITS_PER_TURN = 15
STREAM_COMMITS = 3000


def _batch(first: int, output: str) -> list[StoredEvent]:
    return [
        StoredEvent("s1", sequence, time.time(), "t1", ToolCallFinished(f"c{sequence}", "read",
                                                                        ToolResult(output=output), 0.0, 0.001))
        for sequence in range(first, first + EVENTS_PER_COMMIT)
    ]


def _batches(pattern: str, turns: int, pause: float) -> Iterator[list[StoredEvent]]:
    """The pattern's commits, in order; a turn's pause is taken between two of them, untimed."""
    if pattern == "turns":
        output = "     1\tone line of source code, about sixty characters long here\n" * 200
        commits, per_turn = turns * COMMITS_PER_TURN, COMMITS_PER_TURN
    else:
        output, commits, per_turn = "x" * 2048, STREAM_COMMITS, 0
    for index in range(commits):
        if per_turn and index and index % per_turn == 0:
            time.sleep(pause)
        yield _batch(1 + index * EVENTS_PER_COMMIT, output)


def run_round(pattern: str, checkpoint_delay: float | None, turns: int, pause: float) -> list[float]:
    """The commit times (seconds) of one round on a new store."""
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "bench.db", checkpoint_delay=checkpoint_delay)
        try:
            store.create_session(SessionRecord(session_id="s1", workspace=scratch))
            times: list[float] = []
            for batch in _batches(pattern, turns, pause):
                started = time.perf_counter()
                store.append_events(batch)
                times.append(time.perf_counter() - started)
            return times
        finally:
            store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--turns", type=count, default=40)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between two turns' commits")
    args = parser.parse_args(argv)
    variants = {
        f"checkpointer thread ({CHECKPOINT_DELAY * 1000:g} ms)": CHECKPOINT_DELAY,
        "SQLite, in the commits": None,
    }
    print(f"{'pattern':8} {'checkpoints':34} {'p50 us':>8} {'p99 us':>8} {'max ms':>8} {'ms per round':>13}")
    for pattern in ("turns", "stream"):
        times: dict[str, list[float]] = {name: [] for name in variants}
        totals: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, delay in variants.items():  # alternating: a noisy moment touches both
                measured = run_round(pattern, delay, args.turns, args.pause)
                times[name] += measured
                totals[name].append(sum(measured))
        for name in variants:
            values = sorted(times[name])
            print(f"{pattern:8} {name:34} {percentile(values, 50) * 1e6:8.0f} {percentile(values, 99) * 1e6:8.0f} "
                  f"{values[-1] * 1e3:8.1f} {statistics.median(totals[name]) * 1e3:13.1f}")
    print(f"(turns: {args.turns} turns of {COMMITS_PER_TURN} commits of {EVENTS_PER_COMMIT} events of 12 KB, "
          f"{args.pause * 1000:g} ms apart; stream: {STREAM_COMMITS} commits of {EVENTS_PER_COMMIT} events of 2 KB "
          f"back to back; ms per round: the commits' total, the median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
