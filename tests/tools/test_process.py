"""bash and execute: output limits, timeouts, process groups, cancellation, concurrency."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.processes import all_gone, pids_with
from tool_worker.tools import process
from tool_worker.tools.base import ErrorKind


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


async def test_timeout_kills_the_whole_group(call: Any, mark: str) -> None:
    started = time.monotonic()
    result = await call("bash", command=f"echo started; sleep {mark} & sleep {mark} & wait", timeout=500)
    assert time.monotonic() - started < 3
    assert result.error_kind is ErrorKind.TIMEOUT and result.exit_code is None
    assert result.output.startswith("started")
    assert "timed out after 500 ms" in result.output
    assert await all_gone(mark)


async def test_setsid_does_not_escape_the_timeout_kill(call: Any, mark: str) -> None:
    result = await call("bash", command=f"setsid sleep {mark} & sleep {mark}", timeout=500)
    assert result.error_kind is ErrorKind.TIMEOUT
    assert await all_gone(mark)


async def test_background_processes_do_not_outlive_the_call(call: Any, mark: str) -> None:
    started = time.monotonic()
    result = await call("bash", command=f"sleep {mark} & setsid sleep {mark} & nohup sleep {mark} >/dev/null 2>&1 &")
    assert time.monotonic() - started < 3 and result.exit_code == 0
    assert await all_gone(mark)


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


async def test_cancellation_kills_the_group(registry: Any, workspace: Path, mark: str) -> None:
    command = f"sleep {mark} & setsid sleep {mark} & echo started > flag; wait"
    task = asyncio.create_task(registry.execute("bash", workspace, json.dumps({"command": command})))
    flag = workspace / "flag"
    for _ in range(500):
        if flag.exists() and len(pids_with(mark)) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(pids_with(mark)) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_gone(mark)


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
