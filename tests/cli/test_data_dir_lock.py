"""One server per data directory: a second one is refused in one line, having touched nothing of
the first's (its turns, its sandboxed commands, its event numbering), and may start once the first
has stopped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from session_server import main as server_main
from session_server.server import CodelaneServer, ServerConfig
from tests.cli.conftest import cli
from tests.processes import all_gone, kill_all


async def test_a_second_server_on_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data, local_workers=0))
    await first.start()
    try:
        second = await asyncio.to_thread(
            cli, "server", "--listen", "127.0.0.1:0", "--data-dir", str(data), "--local-workers", "0", timeout=60,
        )
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr == (
            f"codelane server: the data directory {data} is in use by another codelane server (pid {os.getpid()}): "
            "stop it, or give this server its own --data-dir\n"
        )
        in_process = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data, local_workers=0))
        with pytest.raises(OSError, match="is in use by another codelane server"):
            await in_process.start()
        await in_process.stop(grace=0.1)
        assert first.store is not None and first.store.count_sessions() == 0  # the first one still serves
    finally:
        await first.stop(grace=0.5)
    after = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data, local_workers=0))
    await after.start()
    await after.stop(grace=0.5)


def test_a_data_dir_whose_lock_cannot_be_taken_says_which_and_why(tmp_path: Path) -> None:
    # As a directory the server cannot write: it said "[Errno 21] Is a directory: '...'" (or
    # Errno 13), not which data directory or what to do.
    data = tmp_path / "data"
    (data / "lock").mkdir(parents=True)
    out = cli("server", "--listen", "127.0.0.1:0", "--data-dir", str(data), "--local-workers", "0", timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"codelane server: cannot use the data directory {data}: {data}/lock: Is a directory: "
                          "the server must be able to write there\n")


async def test_a_server_cancelled_as_it_starts_still_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ctrl-C in the moment between the start and the server's own signal handlers reaches
    # `codelane server` as asyncio.run's cancellation of its task: the server must stop all the
    # same (it was left running, its local workers and data directory lock held, and the process
    # hung on its way out).
    data = tmp_path / "data"
    started = asyncio.Event()
    main_task: asyncio.Task[None] | None = None

    def cancel_at_start() -> None:  # called once the server has started, before its handlers
        assert main_task is not None
        main_task.cancel()
        started.set()

    monkeypatch.setattr(server_main, "freeze_startup_heap", cancel_at_start)
    config = ServerConfig(listen="127.0.0.1:0", data_dir=data, local_workers=1)
    try:
        main_task = asyncio.create_task(server_main._serve_until_stopped(config, 0.5))
        with pytest.raises(asyncio.CancelledError):
            await main_task
        assert started.is_set()
        assert await all_gone(str(os.getpid()))  # the local worker (`--parent-pid` this process)
        after = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data, local_workers=0))
        await after.start()  # the data directory was released
        await after.stop(grace=0.5)
    finally:
        kill_all(str(os.getpid()))
