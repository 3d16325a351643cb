"""`codelane conformance worker` and `client`: the Python worker and SDK pass them, and a worker or a
client that breaks one rule fails the check that names the rule. Every run is the real CLI, a real
hub or server, and real worker and client processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from session_server.conformance.client import CHECKS as CLIENT_CHECKS
from session_server.conformance.worker import CHECKS, START_WITHIN

REPO = Path(__file__).resolve().parents[2]

KIT_TIMEOUT = 90.0


async def conformance(*worker: str, logs: Path, within: float = 10.0) -> tuple[int, dict[str, tuple[str, str]]]:
    """Runs the kit on a worker command; returns its exit status and {check: (status, reason)}.
    The kit keeps its logs for the user: here they go in `logs` (the test's own directory)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codelane.cli", "conformance", "worker", "--within", str(within),
        "--logs", str(logs), "--", *worker,
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


@pytest.mark.parametrize("placement", ["shared", "synced"])
async def test_the_python_worker_passes_every_check(placement: str, tmp_path: Path) -> None:
    # A --root elsewhere keeps the worker off the kit's workspace path: it syncs a copy from the
    # kit's CAS instead of using the path (shared).
    roots = ["--root", str(tmp_path), "--cache-dir", str(tmp_path / "cache")] if placement == "synced" else []
    code, outcomes = await conformance(sys.executable, "-m", "tool_worker", "--connect", "{hub}", "--slots", "2",
                                       *roots, logs=tmp_path / "logs")
    stderr = outcomes.pop("<stderr>")[1]
    assert code == 0, (outcomes, stderr)
    assert list(outcomes) == [name for name, _ in CHECKS]
    assert all(status == "PASS" for status, _ in outcomes.values()), outcomes
    assert "exited with status 3" in outcomes["wrong-token"][1]
    assert outcomes["content-sync"][1].endswith(f"({placement})"), outcomes["content-sync"]


@pytest.mark.parametrize(
    ("fault", "check", "saying"),
    [
        ("wrong-dispatch-id", "assign", "dispatch ids it was never given: not-"),
        ("no-heartbeat", "heartbeats", "0 heartbeats"),
    ],
)
async def test_a_worker_breaking_a_rule_fails_the_check_that_names_it(
    fault: str, check: str, saying: str, tmp_path: Path
) -> None:
    code, outcomes = await conformance(sys.executable, "-m", "tests.contract.broken_worker", "--connect", "{hub}",
                                       "--fault", fault, within=2.0, logs=tmp_path)
    stderr = outcomes.pop("<stderr>")[1]
    assert code == 1
    assert outcomes["hello"][0] == "PASS", outcomes
    status, reason = outcomes[check]
    assert status == "FAIL" and saying in reason, outcomes
    assert f"({', '.join(n for n, (s, _) in outcomes.items() if s == 'FAIL')})" in stderr


async def client_conformance(*command: str, logs: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codelane.cli", "conformance", "client", "--logs", str(logs), "--", *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), KIT_TIMEOUT)
    outcomes = {}
    for line in out.decode().splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL"):
            name, _, reason = rest.partition(": ")
            outcomes[name] = (status, reason)
    assert proc.returncode is not None
    return proc.returncode, outcomes


async def test_the_python_sdk_passes_the_client_kit(tmp_path: Path) -> None:
    scenario = REPO / "clients/python/examples/conformance_client.py"
    code, outcomes = await client_conformance(sys.executable, str(scenario), logs=tmp_path)
    assert code == 0, outcomes
    assert list(outcomes) == [name for name, _ in CLIENT_CHECKS]
    assert all(status == "PASS" for status, _ in outcomes.values()), outcomes


async def test_a_client_that_misses_an_event_on_resume_fails_the_resume_check(tmp_path) -> None:
    # The Python scenario, with the first replayed event dropped, as a client resuming one too late would.
    script = (REPO / "clients/python/examples/conformance_client.py").read_text()
    lossy = script.replace('                print("replay", item.sequence, item.kind)',
                           '                if item.sequence > 3:\n'
                           '                    print("replay", item.sequence, item.kind)')
    assert lossy != script
    (tmp_path / "lossy.py").write_text(lossy)
    code, outcomes = await client_conformance(sys.executable, str(tmp_path / "lossy.py"), logs=tmp_path / "logs")
    assert code == 1
    assert outcomes["resume"][0] == "FAIL" and "differ from the server's" in outcomes["resume"][1]
    assert outcomes["turn"][0] == "PASS" and outcomes["errors"][0] == "PASS"


def test_the_kits_help_cites_sections_that_exist_and_says_what_within_bounds() -> None:
    def help_of(kind: str) -> str:
        out = subprocess.run([sys.executable, "-m", "codelane.cli", "conformance", kind, "--help"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return " ".join(out.split())

    client, worker = help_of("client"), help_of("worker")
    headings = {line.lstrip("#").strip() for line in (REPO / "docs" / "protocol.md").read_text().splitlines()
                if line.startswith("#")}
    for text in (client, (REPO / "clients" / "python" / "examples" / "conformance_client.py").read_text()):
        cited = re.findall(r'docs/protocol\.md[,( ]*"([^"]+)"', " ".join(text.split()))
        assert cited and set(cited) <= headings, cited
    # A short --within does not shorten a worker's start: the help says so, and by how much.
    assert f"get at least {START_WITHIN:g}s however short SECONDS is" in worker
