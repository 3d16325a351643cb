"""--cache-size bounds what a worker's cache slot takes on disk: trees moving or left half-written
by a failed sync count, and a file counts its whole blocks (tool_worker/merkle.disk_bytes)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from session_server.server import CodelaneServer, ServerConfig
from tests.workspaces.conftest import snapshot
from tool_worker.cas import CasClient
from tool_worker.workspaces import WorkspaceManager, WorkspaceUnavailable

MB = 1_000_000



def on_disk(path: str) -> int:
    """What `du` says `path` takes (blocks, directories included)."""
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def workspace(root: Path, files: int, size: int) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"f{i}").write_bytes(os.urandom(size))
    return root


@pytest.fixture
async def cache(tmp_path: Path):
    """(server, a function making a manager on a cache of the size given)."""
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data"))
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    managers = []

    def manager(size: int) -> WorkspaceManager:
        made = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "cache"),
                                cache_size=size)
        made.configure(CasClient(channel), server.snapshots.excludes)
        managers.append(made)
        return made

    yield server, manager
    for made in managers:
        made.close()
    await channel.close()
    await server.stop(grace=0.5)


async def test_two_workspaces_synced_at_once_stay_within_cache_size(cache, tmp_path: Path) -> None:
    # A tree being moved counted nothing in the other sync's sum: both fitted "on paper", and
    # the slot held 12 MB under a 10 MB bound.
    server, make = cache
    manager = make(10 * MB)
    refs = [await snapshot(server, workspace(tmp_path / name, 6, MB)) for name in ("a", "b")]
    results = await asyncio.gather(*(manager.place(ref) for ref in refs), return_exceptions=True)
    placed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(placed) == 1 and isinstance(refused[0], WorkspaceUnavailable), results
    assert "--cache-size" in str(refused[0])
    assert on_disk(manager.slot) <= manager.cache_size
    placed[0].release()


async def test_a_tree_a_failed_sync_left_half_written_counts_and_makes_room(
    cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sync that failed half-way left a tree that counted nothing and could never be evicted: the
    # next workspace's sync wrote beside it, past the bound.
    server, make = cache
    manager = make(10 * MB)
    a = workspace(tmp_path / "a", 6, MB)
    b = workspace(tmp_path / "b", 7, MB)
    original = WorkspaceManager._write_batch
    written = []

    def failing(self, tree, plan, batch):
        for item in batch:
            if len(written) == 4:
                raise OSError(errno.EIO, "Input/output error")
            original(self, tree, plan, [item])
            written.append(item)

    monkeypatch.setattr(WorkspaceManager, "_write_batch", failing)
    with pytest.raises(WorkspaceUnavailable, match="Input/output error"):
        await manager.place(await snapshot(server, a))
    assert on_disk(manager.slot) >= 4 * MB  # four files of a were written
    monkeypatch.setattr(WorkspaceManager, "_write_batch", original)
    placement = await manager.place(await snapshot(server, b))  # a's half-tree goes for room
    assert on_disk(manager.slot) <= manager.cache_size
    assert sorted(os.listdir(placement.path)) == sorted(os.listdir(b))
    placement.release()


async def test_many_small_files_count_their_blocks_not_their_bytes(cache, tmp_path: Path) -> None:
    # 5,000 files of 60 bytes are 300 KB of content and 20 MB of disk: a 2 MB bound let them in.
    server, make = cache
    space = tmp_path / "small"
    for d in range(20):
        (space / f"d{d}").mkdir(parents=True)
        for i in range(250):
            (space / f"d{d}" / f"f{i}.txt").write_text(f"{d}/{i}\n" * 10)
    ref = await snapshot(server, space)
    with pytest.raises(WorkspaceUnavailable, match="--cache-size"):
        await make(2 * MB).place(ref)
    manager = make(25 * MB)
    placement = await manager.place(ref)
    placement.release()
    assert on_disk(os.path.join(manager.slot, "trees")) <= manager.cache_size
