"""codelane's benchmarks: each prints its figures; ratios are measured side by side in one run."""

import argparse


def count(text: str) -> int:
    """An argparse type for how many rounds, calls or samples to measure: at least one (a median
    of none is no figure; statistics raised on it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too few: at least 1")
    return value
