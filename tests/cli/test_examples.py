"""The quickstart examples and `codelane demo`, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import CLI_TIMEOUT, cli, cli_env

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples"


@pytest.mark.parametrize("example", ["quickstart_async.py", "quickstart_sync.py"])
def test_quickstart_examples(example: str, make_server, workspace: Path) -> None:
    server = make_server(model=f"scripted:{EXAMPLES / 'quickstart.yaml'}", local_workers=1)
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / example), str(workspace)], capture_output=True, text=True,
        timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL, env=cli_env(CODELANE_SERVER=server.address),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("session s_") and str(workspace) in lines[0]
    stopped = next(i for i, line in enumerate(lines) if line.startswith("-- stopped listening after sequence"))
    last_seen = int(lines[stopped].split("sequence ")[1].split(";")[0])
    assert f"[{last_seen}] -> " in lines[stopped - 1]
    assert f"[{last_seen + 1}]" in lines[stopped + 1]  # resumed exactly after it
    assert any(line.startswith("-- caught up at sequence") for line in lines)
    assert any("turn finished: end_turn, 3 tool call(s)" in line for line in lines)
    assert lines[-1].startswith("history #") and "assistant" in lines[-1]


def test_demo_runs_and_exits_0() -> None:
    out = cli("demo", timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "turn finished: end_turn" in out.stdout
    assert 'return f"Hello, {name}{PUNCTUATION}"' in out.stdout  # the edit happened
