"""bash and execute: output limits, timeouts, process groups, cancellation, concurrency."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import process
from tool_worker.tools.base import ErrorKind


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 may be slow to reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def _gone(pids: list[int]) -> bool:
    for _ in range(100):
        if not any(_alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_bash_output_and_exit_code(call: Any) -> None:
    ok = await call("bash", command="echo out; echo err >&2; pwd")
    assert not ok.is_error and ok.exit_code == 0
    lines = ok.output.splitlines()
    assert lines[:2] == ["out", "err"] and Path(lines[2]).name == "ws"
    failed = await call("bash", command="echo nope; exit 3")
    assert failed.is_error and failed.error_kind is ErrorKind.TOOL_ERROR and failed.exit_code == 3
    assert failed.output == "nope\n\n[exit code 3]"
    silent = await call("bash", command="true")
    assert silent.output == "(no output)"


async def test_execute_argv_without_shell(call: Any) -> None:
    result = await call("execute", argv=["echo", "$HOME", "a b"])
    assert result.output == "$HOME a b" and result.exit_code == 0
    missing = await call("execute", argv=["definitely-not-a-program"])
    assert missing.is_error and "definitely-not-a-program" in missing.output
    assert (await call("execute", argv=[])).error_kind is ErrorKind.INVALID_ARGUMENTS


async def test_timeout_kills_the_whole_group(call: Any) -> None:
    started = time.monotonic()
    result = await call("bash", command="echo started; sleep 100 & echo $!; sleep 100 & echo $!; wait", timeout=500)
    assert time.monotonic() - started < 3
    assert result.error_kind is ErrorKind.TIMEOUT and result.exit_code is None
    assert result.output.startswith("started\n")
    assert "timed out after 500 ms" in result.output
    grandchildren = [int(line) for line in result.output.splitlines()[1:3]]
    assert await _gone(grandchildren)


async def test_background_processes_do_not_outlive_the_call(call: Any) -> None:
    started = time.monotonic()
    result = await call("bash", command="sleep 100 & echo $!")
    assert time.monotonic() - started < 3 and result.exit_code == 0
    assert await _gone([int(result.output)])


async def test_large_output_cut_from_the_middle(call: Any) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = await call("bash", command="head -c 12000000 /dev/zero | tr '\\0' a; echo; echo THE-END")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 4_000_000, f"peak {peak} bytes"
    assert result.truncated and not result.is_error
    assert len(result.output) < process.MAX_OUTPUT_CHARS + 500
    omitted = 12_000_000 + 2 + len("THE-END") - process.MAX_OUTPUT_CHARS
    assert f"[{omitted} characters omitted from the middle of the output" in result.output
    assert result.output.startswith("a" * 100) and result.output.endswith("a\nTHE-END")


async def test_cancellation_kills_the_group(registry: Any, workspace: Path) -> None:
    command = "sleep 100 & echo $! > pids; echo $$ >> pids; wait"
    task = asyncio.create_task(registry.execute("bash", workspace, json.dumps({"command": command})))
    pid_file = workspace / "pids"
    for _ in range(200):
        if pid_file.exists() and len(pid_file.read_text().split()) == 2:
            break
        await asyncio.sleep(0.01)
    pids = [int(pid) for pid in pid_file.read_text().split()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(pids)


async def test_two_calls_run_concurrently(call: Any) -> None:
    started = time.monotonic()
    first, second = await asyncio.gather(
        call("bash", command="sleep 0.5; echo one"), call("execute", argv=["sleep", "0.5"])
    )
    elapsed = time.monotonic() - started
    assert first.output == "one" and second.exit_code == 0
    assert elapsed < 0.9, f"{elapsed:.2f} s: the calls ran one after the other"


async def test_timeout_is_bounded(call: Any) -> None:
    result = await call("bash", command="true", timeout=process.MAX_TIMEOUT_MS + 1)
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS and "timeout" in result.output
