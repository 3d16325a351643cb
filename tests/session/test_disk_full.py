"""A call the store fails (its disk is full) ends UNAVAILABLE (STORE_UNAVAILABLE), saying what to do.

The store is on a real full disk: a small tmpfs (root only, as in CI), filled with a file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.session.conftest import InProcess, rpc_error, scripted


class SmallDisk:
    """A 16 MiB tmpfs that the test fills and frees."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        with self._filler.open("ab") as filler:
            with contextlib.suppress(OSError):  # ENOSPC: full
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Listed before the server fixtures, so that their processes are gone when it unmounts."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # a process of the test holds it yet


async def test_a_call_the_store_cannot_take_is_unavailable_and_says_what_to_do(
    small_disk: SmallDisk, make_server, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = scripted(tmp_path, [{"text": "Done."}])
    server: InProcess = await make_server(data_dir=small_disk.path / "data", model=model)
    client = server.client
    kept = await client.create(workspace)
    small_disk.fill()
    # Far more than the store's WAL holds: storing it needs room on the disk.
    prompt = "x" * 200_000
    caplog.clear()
    details = await rpc_error(client.create(workspace, system_prompt=prompt))
    assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "STORE_UNAVAILABLE", details
    assert details.metadata == {"sqlite_error": "SQLITE_FULL"}
    assert "disk" in details.message and "free space" in details.message, details.message
    # One line in the log saying why, and no traceback (grpc logs one for an exception it meets).
    assert [(r.levelname, r.exc_info) for r in caplog.records if "CreateSession" in r.getMessage()] == [
        ("ERROR", None)]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert (await client.get(kept.session_id)).session_id == kept.session_id  # reads go on
    small_disk.free()
    assert (await client.create(workspace, system_prompt=prompt)).config.system_prompt == prompt
