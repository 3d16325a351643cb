"""bash and execute: output limits, timeouts, process groups, cancellation, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.polling import poll_until
from tests.processes import all_gone, pids_with
from tool_worker.confinement import bwrap
from tool_worker.tools import process
from tool_worker.tools.base import ErrorKind

# Only turns a hang into a failure: nothing here depends on how fast a call runs.
BOUND = 30.0


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
    # The sleeps never end on their own: the call returns only because the timeout killed them.
    result = await asyncio.wait_for(
        call("bash", command=f"echo started; sleep {mark} & sleep {mark} & wait", timeout=500), BOUND)
    assert result.error_kind is ErrorKind.TIMEOUT and result.exit_code is None
    assert result.output.startswith("started")
    assert "timed out after 500 ms" in result.output
    assert await all_gone(mark)


async def test_setsid_does_not_escape_the_timeout_kill(call: Any, mark: str) -> None:
    result = await call("bash", command=f"setsid sleep {mark} & sleep {mark}", timeout=500)
    assert result.error_kind is ErrorKind.TIMEOUT
    assert await all_gone(mark)


async def test_background_processes_do_not_outlive_the_call(call: Any, mark: str) -> None:
    # The call returns when bash exits, without waiting for the background sleeps (which never end).
    command = f"sleep {mark} & setsid sleep {mark} & nohup sleep {mark} >/dev/null 2>&1 &"
    result = await asyncio.wait_for(call("bash", command=command), BOUND)
    assert result.exit_code == 0
    assert await all_gone(mark)


async def test_large_output_cut_from_the_middle(call: Any) -> None:
    tracemalloc.start()
    try:
        result = await call("bash", command="head -c 12000000 /dev/zero | tr '\\0' a; echo; echo THE-END")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
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
    await poll_until(lambda: flag.exists() and len(pids_with(mark)) == 2, what="the command and its two sleeps")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_gone(mark)


async def test_two_calls_run_concurrently(call: Any, workspace: Path) -> None:
    # Opening a FIFO blocks until its other end is opened: each call can finish only while the
    # other one runs. Run one after the other, the first would block for ever.
    os.mkfifo(workspace / "pipe")
    both = asyncio.gather(call("bash", command="echo one > pipe"), call("execute", argv=["cat", "pipe"]))
    try:
        writer, reader = await asyncio.wait_for(both, BOUND)
    except TimeoutError:
        raise AssertionError("the two calls did not run at the same time") from None
    assert writer.exit_code == 0 and reader.exit_code == 0 and reader.output == "one"


async def test_a_command_longer_than_execve_takes_is_refused_saying_what_to_do(call: Any) -> None:
    # bash -c passes the command as one argument: past Linux's MAX_ARG_STRLEN (32 pages, its NUL
    # included) the kernel refused it and the model read only "Argument list too long" (exit 126).
    longest = 32 * 4096 - 1
    script = "true #" + "x" * longest
    long = await call("bash", command=script)
    assert long.error_kind is ErrorKind.INVALID_ARGUMENTS, long.output
    assert long.output.startswith("the command is 131,077 bytes") and "write" in long.output, long.output
    assert "xxx" not in long.output
    many = await call("execute", argv=["true", *["y" * 100_000] * 30])
    assert many.error_kind is ErrorKind.INVALID_ARGUMENTS and "total" in many.output, many.output
    fits = await call("bash", command="true #" + "x" * (longest - 6))
    assert fits.exit_code == 0, fits.output


async def test_timeout_is_bounded(call: Any) -> None:
    result = await call("bash", command="true", timeout=process.MAX_TIMEOUT_MS + 1)
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS and "timeout" in result.output


async def test_a_planted_git_redirect_is_removed_off_the_event_loop(
    call: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A command may fill the .git/commondir it plants with a million files: removing them on the
    # event loop stalled the whole server (every session, the workers' heartbeats) for as long.
    (workspace / ".git" / "hooks").mkdir(parents=True)
    (workspace / ".git" / "config").write_text("[core]\n")
    removed_on_loop: list[str] = []
    rmtree = shutil.rmtree

    def spied(path: Any, *arguments: Any, **keywords: Any) -> None:
        if threading.current_thread() is threading.main_thread() and str(path).startswith(str(workspace)):
            removed_on_loop.append(str(path))
        rmtree(path, *arguments, **keywords)

    monkeypatch.setattr(shutil, "rmtree", spied)
    result = await call("bash", command="mkdir -p .git/commondir/d && touch .git/commondir/d/f && echo planted")
    assert result.error_kind is ErrorKind.PERMISSION_DENIED and ".git/commondir removed" in result.output
    assert not (workspace / ".git" / "commondir").exists()
    assert removed_on_loop == []


async def test_the_paths_a_sandbox_guards_are_found_off_the_event_loop(
    call: Any, registry: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A command may make .git/modules hold 500,000 directories: each is a submodule whose hooks and
    # config the next sandbox protects, and finding them on the event loop stalled the server
    # (every session) for seconds at every call of that workspace, and again as its next sandbox
    # was built ahead. (Without .git/modules there are a few paths to look at, found on the loop:
    # cheaper than the hop to a thread.)
    (workspace / ".git" / "hooks").mkdir(parents=True)
    (workspace / ".git" / "config").write_text("[core]\n")
    (workspace / ".git" / "modules" / "sub").mkdir(parents=True)
    # The host is probed once per process (a trial sandbox in a directory of its own), by
    # whichever test first uses the shared registry's sandbox: done before the spies, which are
    # about each call's work (in a random order, this test was sometimes the first).
    registry.sandbox.support()
    on_loop: list[str] = []

    def spied(module: Any, name: str) -> None:
        function = getattr(module, name)

        def wrapper(*arguments: Any, **keywords: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            return function(*arguments, **keywords)

        monkeypatch.setattr(module, name, wrapper)

    spied(bwrap, "protected_targets")
    spied(process, "absent_git_redirects")
    result = await call("bash", command="echo ran")
    assert result.output == "ran"
    assert on_loop == []
