"""`codelane conformance worker`: the Python worker passes it, and workers that break one rule fail
the check that names the rule. Every run is the real CLI, a real hub and real worker processes."""

from __future__ import annotations

import asyncio
import sys

import pytest

from session_server.conformance.worker import CHECKS

KIT_TIMEOUT = 90.0


async def conformance(*worker: str, within: float = 10.0) -> tuple[int, dict[str, tuple[str, str]]]:
    """Runs the kit on a worker command; returns its exit status and {check: (status, reason)}."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codelane.cli", "conformance", "worker", "--within", str(within), "--", *worker,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), KIT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    outcomes = {}
    for line in out.decode().splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, reason = rest.partition(": ")
            outcomes[name] = (status, reason)
    assert proc.returncode is not None
    return proc.returncode, outcomes | {"<stderr>": ("", err.decode())}


async def test_the_python_worker_passes_every_check() -> None:
    code, outcomes = await conformance(sys.executable, "-m", "tool_worker", "--connect", "{hub}", "--slots", "2")
    stderr = outcomes.pop("<stderr>")[1]
    assert code == 0, (outcomes, stderr)
    assert list(outcomes) == [name for name, _ in CHECKS]
    assert all(status == "PASS" for status, _ in outcomes.values()), outcomes
    assert "exited with status 3" in outcomes["wrong-token"][1]


@pytest.mark.parametrize(
    ("fault", "check", "saying"),
    [
        ("wrong-dispatch-id", "assign", "dispatch ids it was never given: not-"),
        ("no-heartbeat", "heartbeats", "0 heartbeats"),
    ],
)
async def test_a_worker_breaking_a_rule_fails_the_check_that_names_it(fault: str, check: str, saying: str) -> None:
    code, outcomes = await conformance(sys.executable, "-m", "tests.contract.broken_worker", "--connect", "{hub}",
                                       "--fault", fault, within=2.0)
    stderr = outcomes.pop("<stderr>")[1]
    assert code == 1
    assert outcomes["hello"][0] == "PASS", outcomes
    status, reason = outcomes[check]
    assert status == "FAIL" and saying in reason, outcomes
    assert f"({', '.join(n for n, (s, _) in outcomes.items() if s == 'FAIL')})" in stderr
