"""One server per data directory: a second one is refused in one line, having touched nothing of
the first's (its turns, its sandboxed commands, its event numbering), and may start once the first
has stopped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from session_server.server import CodelaneServer, ServerConfig
from tests.cli.conftest import cli


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
