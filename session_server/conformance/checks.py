"""What both conformance kits share: how long they wait, how a check fails or is skipped, its
outcome, and the run of every check in order, each one's failure reported rather than raised."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

# --within: how long the worker kit waits for each thing a worker must do (answer, drain, ...).
DEFAULT_WITHIN = 15.0
# At least this long for what starting a process takes (the worker's first Hello, the exit of the
# one with a wrong token) and for a reconnection after its backoff: not what the checks judge.
START_WITHIN = 30.0
# The client kit's command plays its whole scenario in one run: it gets this many times --within.
SCENARIO_WITHINS = 4


class CheckFailed(Exception):
    """The implementation did not do what the protocol asks; the message says what was seen."""


class Skipped(Exception):
    """An earlier failure leaves nothing to check."""


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    reason: str


Context = TypeVar("Context")


async def run_all(checks: Sequence[tuple[str, Callable[[Context], Awaitable[str]]]], ctx: Context,
                  report: Callable[[Outcome], None]) -> list[Outcome]:
    """Runs the checks one after another; calls `report` as each one ends."""
    outcomes = []
    for name, check in checks:
        try:
            outcome = Outcome(name, "PASS", await check(ctx))
        except CheckFailed as exc:
            outcome = Outcome(name, "FAIL", str(exc))
        except Skipped as exc:
            outcome = Outcome(name, "SKIP", str(exc))
        except Exception as exc:  # a bug of the kit's, reported as such rather than a traceback
            outcome = Outcome(name, "FAIL", f"the check itself failed: {type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        report(outcome)
    return outcomes
