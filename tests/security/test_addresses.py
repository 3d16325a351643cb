"""Addresses without a port are errors, not port 443; a port in use is refused, not shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.session.conftest import START_TIMEOUT, free_port

# Bounds a command that should exit at once; one that starts serving instead fails the test.
EXIT_TIMEOUT = 30.0


def codelane(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODELANE_")}
    return subprocess.run(
        [sys.executable, "-m", "codelane.cli", *argv], capture_output=True, text=True, timeout=EXIT_TIMEOUT,
        cwd=cwd, env=env, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("server", "--listen", "127.0.0.1", "--local-workers", "0"),
        ("worker", "--connect", "127.0.0.1"),
        ("sessions", "--server", "127.0.0.1"),
        ("workers", "--server", "localhost"),
    ],
)
def test_an_address_without_a_port_is_a_usage_error(tmp_path: Path, argv: tuple[str, ...]) -> None:
    result = codelane(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "has no port: give HOST:PORT" in result.stderr


def test_a_second_server_on_a_port_in_use_is_refused(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "codelane.cli", "server", "--listen", f"127.0.0.1:{port}", "--local-workers", "0",
            "--data-dir", str(tmp_path / "first")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None
        # "codelane server listening on ..." once bound (after a line about its sandbox).
        ready = ""
        while "listening" not in ready:
            ready = first.stdout.readline()
            assert ready, "the first server exited before it listened"
        second = codelane("server", "--listen", f"127.0.0.1:{port}", "--local-workers", "0",
                          "--data-dir", str(tmp_path / "second"), cwd=tmp_path)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(START_TIMEOUT)
