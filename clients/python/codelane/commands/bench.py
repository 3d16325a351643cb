"""`codelane bench`: when parallel tool calls pay. The benchmark lives in `benchmarks.bench`
(installed with codelane); its peers need the bench extra: pip install -e '.[bench]'."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from benchmarks.bench import main as bench_main
    except ImportError as exc:
        print(f"codelane bench: the benchmarks package is not available ({exc}); "
              "install codelane from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    return bench_main(argv)
