"""The worker's synced trees against a real server's content service: a call never runs on a
tree that is moving, two snapshots wanted at once get two trees, and a malformed tree is refused."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2_grpc
from codelane.reapi import remote_execution_pb2 as reapi
from codelane.v1 import workspace_pb2
from session_server.content import STREAM_CHUNK
from session_server.server import CodelaneServer, ServerConfig
from tests.polling import poll_until
from tests.workspaces.conftest import snapshot
from tool_worker import merkle
from tool_worker import workspaces as workspaces_module
from tool_worker.cas import BlobMissing, CasClient, ContentError
from tool_worker.merkle import Digest, SnapshotRef
from tool_worker.workspaces import SnapshotChanged, WorkspaceManager, WorkspaceUnavailable


def found(root: Path, name: str) -> list[Path]:
    return list(root.rglob(name))


def present(path: Path) -> bool:
    return path.exists()




async def test_two_snapshots_wanted_at_once_get_two_trees_and_readers_keep_theirs(setup) -> None:
    ws, server, manager, _ = setup
    first = await manager.place(await snapshot(server, ws))
    assert first.mapped and (Path(first.path) / "a.txt").read_text() == "version 1\n"
    (ws / "a.txt").write_text("version 2\n")
    (ws / "b.txt").write_text("new\n")
    second = await manager.place(await snapshot(server, ws))
    assert second.path != first.path  # the first tree has a reader: it is not moved under it
    assert (Path(first.path) / "a.txt").read_text() == "version 1\n"
    assert not (Path(first.path) / "b.txt").exists()
    assert (Path(second.path) / "a.txt").read_text() == "version 2\n"
    again = await manager.place(await snapshot(server, ws))
    assert again.path == second.path  # held already: a lookup
    for placement in (first, second, again):
        placement.release()
    (ws / "a.txt").write_text("version 3\n")
    third = await manager.place(await snapshot(server, ws))
    assert third.path in (first.path, second.path)  # an idle tree moves; no third tree
    assert (Path(third.path) / "a.txt").read_text() == "version 3\n"
    assert manager.holdings[str(ws)].mode == "synced"


async def test_workers_sharing_a_cache_dir_never_move_the_same_tree(setup, tmp_path: Path) -> None:
    # Two workers on one host with the default --cache-dir: each claims a slot of its own, so a
    # tree one of them is moving is never the tree the other reads.
    ws, server, manager, channel = setup
    other = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=manager.cache_dir)
    other.configure(CasClient(channel), server.snapshots.excludes)
    try:
        wanted = await snapshot(server, ws)
        mine, theirs = await manager.place(wanted), await other.place(wanted)
        assert mine.mapped and theirs.mapped
        their_slot = other.slot
        assert manager.slot != their_slot
        assert Path(mine.path).is_relative_to(manager.slot) and Path(theirs.path).is_relative_to(their_slot)
        (ws / "a.txt").write_text("version 2\n")
        mine.release()
        moved = await manager.place(await snapshot(server, ws))
        assert (Path(moved.path) / "a.txt").read_text() == "version 2\n"
        assert (Path(theirs.path) / "a.txt").read_text() == "version 1\n"  # theirs untouched
        moved.release()
        theirs.release()
    finally:
        other.close()
    # A slot is free again once its worker is gone: the next one takes it, with its trees.
    successor = WorkspaceManager(cache_dir=manager.cache_dir)
    try:
        assert successor.slot == their_slot and "trees" in os.listdir(their_slot)
    finally:
        successor.close()


async def test_idle_copies_of_other_workspaces_make_room_least_recently_used_first(setup, tmp_path: Path) -> None:
    # A worker that once synced a workspace must not refuse every other one for ever: the copies
    # nobody reads go, least recently used first; a copy being read never does.
    _, server, _, channel = setup
    manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "small-cache"),
                               cache_size=250_000)
    manager.configure(CasClient(channel), server.snapshots.excludes)
    spaces = []
    for name in ("old", "newer", "newest"):
        space = tmp_path / name
        space.mkdir()
        (space / "data.bin").write_bytes(name.encode() * (100_000 // len(name)))
        spaces.append(space)
    old, newer, newest = spaces
    try:
        placed = {}
        for space in (old, newer):
            placed[space] = await manager.place(await snapshot(server, space))
            placed[space].release()
        old_copy, newer_copy = Path(placed[old].path), Path(placed[newer].path)
        reading = await manager.place(await snapshot(server, newer))  # used again: now the newest use
        third = await manager.place(await snapshot(server, newest))  # 300 KB > 250 KB: one copy goes
        assert (Path(third.path) / "data.bin").read_bytes() == (newest / "data.bin").read_bytes()
        assert not present(old_copy) and present(newer_copy)
        assert manager.holdings[str(old)].mode == "unavailable"
        assert "evicted" in manager.holdings[str(old)].reason
        # Back to the evicted one while both others are read: nothing idle to evict.
        with pytest.raises(WorkspaceUnavailable, match="more than its --cache-size"):
            await manager.place(await snapshot(server, old))
        assert present(newer_copy / "data.bin") and present(Path(third.path) / "data.bin")
        reading.release()
        third.release()
        again = await manager.place(await snapshot(server, old))  # the idle ones make room now
        assert (Path(again.path) / "data.bin").read_bytes() == (old / "data.bin").read_bytes()
        again.release()
    finally:
        manager.close()


async def test_a_worker_forgets_the_least_recently_used_workspace_past_its_bound(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each workspace costs a stat cache, inotify watches and its copies: a worker serving a new
    # workspace per session must not keep them all for its whole life.
    _, server, manager, _ = setup
    monkeypatch.setattr(workspaces_module, "MAX_WORKSPACES", 2)
    spaces, copies = [], []
    for number in range(3):
        space = tmp_path / f"space{number}"
        space.mkdir()
        (space / "a.txt").write_text(f"space {number}\n")
        spaces.append(space)
        placement = await manager.place(await snapshot(server, space))
        copies.append(Path(placement.path))
        placement.release()
    assert sorted(manager.holdings) == sorted(str(space) for space in spaces[1:])
    assert not present(copies[0]) and present(copies[1]) and present(copies[2])
    again = await manager.place(await snapshot(server, spaces[0]))  # synced anew; space1 goes
    assert (Path(again.path) / "a.txt").read_text() == "space 0\n"
    again.release()
    assert sorted(manager.holdings) == sorted(str(space) for space in (spaces[0], spaces[2]))


async def test_copies_an_earlier_worker_left_are_reused_counted_and_go_first(setup, tmp_path: Path) -> None:
    _, server, _, channel = setup
    cache = str(tmp_path / "restarted-cache")
    spaces = {}
    for name in ("x", "y", "z"):
        spaces[name] = tmp_path / f"space-{name}"
        spaces[name].mkdir()
        (spaces[name] / "data.bin").write_bytes(name.encode() * 100_000)

    async def worker(cache_size: int) -> WorkspaceManager:
        manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=cache, cache_size=cache_size)
        manager.configure(CasClient(channel), server.snapshots.excludes)
        return manager

    async def sync(manager: WorkspaceManager, name: str) -> Path:
        placement = await manager.place(await snapshot(server, spaces[name]))
        assert (Path(placement.path) / "data.bin").read_bytes() == name.encode() * 100_000
        placement.release()
        return Path(placement.path)

    first = await worker(250_000)
    x_copy = await sync(first, "x")
    first.close()  # the worker stops; its copy stays
    second = await worker(250_000)
    assert await sync(second, "x") == x_copy  # moved from where the first left it
    y_copy = await sync(second, "y")
    second.close()
    third = await worker(150_000)  # both copies left count: room for z only once they go
    try:
        z_copy = await sync(third, "z")
        assert not present(x_copy) and not present(y_copy) and present(z_copy)
    finally:
        third.close()


def test_a_worker_whose_neighbour_took_the_unslotted_copies_first_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two upgraded workers starting at once on one cache directory: each claims a slot of its
    # own, and both try to take over what a worker before the slots left. The second one's move
    # found nothing there any more, and the worker failed to start on its cache directory.
    cache = tmp_path / "cache"
    (cache / "trees").mkdir(parents=True)
    rename = os.rename

    def taken_meanwhile(source: Any, destination: Any) -> None:
        if str(source) == str(cache / "trees"):
            shutil.rmtree(source)  # the neighbour's move, just before this one
        rename(source, destination)

    monkeypatch.setattr(os, "rename", taken_meanwhile)
    manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(cache))
    try:
        assert Path(manager.slot).parent == cache
    finally:
        manager.close()


async def test_copies_a_worker_from_before_cache_slots_left_are_reused_counted_and_go_first(
    setup, tmp_path: Path
) -> None:
    """Workers before the cache slots (releases up to 2026-12-04) kept their trees and blob store
    in the cache directory itself: upgraded in place, a worker left them there for good, never
    reused and outside --cache-size (10 GiB by default on every host)."""
    _, server, _, channel = setup
    cache = tmp_path / "upgraded-cache"
    spaces = {}
    for name in ("x", "y"):
        spaces[name] = tmp_path / f"space-{name}"
        spaces[name].mkdir()
        (spaces[name] / "data.bin").write_bytes(name.encode() * 100_000)

    async def sync(manager: WorkspaceManager, name: str) -> Path:
        placement = await manager.place(await snapshot(server, spaces[name]))
        assert (Path(placement.path) / "data.bin").read_bytes() == name.encode() * 100_000
        placement.release()
        return Path(placement.path)

    def worker(cache_size: int) -> WorkspaceManager:
        manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(cache), cache_size=cache_size)
        manager.configure(CasClient(channel), server.snapshots.excludes)
        return manager

    first = worker(250_000)
    x_copy = await sync(first, "x")
    first.close()
    # The layout the old worker left: <cache>/trees/<key>-<n> and <cache>/blobs, no slot.
    for name in ("trees", "blobs"):
        (cache / "0" / name).rename(cache / name)
    (cache / "0").rmdir()
    (cache / "0.lock").unlink()
    old_copy = cache / "trees" / x_copy.name

    second = worker(250_000)
    assert await sync(second, "x") == x_copy  # the old copy, moved into the slot
    second.close()
    assert not (cache / "trees").exists() and not (cache / "blobs").exists() and not old_copy.exists()

    for name in ("trees", "blobs"):
        (cache / "0" / name).rename(cache / name)
    third = worker(150_000)  # the old copy counts: room for y only once it goes
    try:
        y_copy = await sync(third, "y")
        assert present(y_copy) and not present(old_copy) and not present(x_copy)
    finally:
        third.close()


async def test_what_an_earlier_worker_left_is_measured_off_the_event_loop(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Measuring an earlier worker's copies walks every file they hold: seconds for a large
    # cache, during which a worker whose loop stood still would miss its heartbeats.
    ws, server, first, channel = setup
    (await first.place(await snapshot(server, ws))).release()
    cache = first.cache_dir
    first.close()
    walked_in = []
    measure = workspaces_module._left_trees

    def spied(directory: str) -> dict[str, int]:
        walked_in.append(threading.current_thread())
        return measure(directory)

    monkeypatch.setattr(workspaces_module, "_left_trees", spied)
    second = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=cache)
    second.configure(CasClient(channel), server.snapshots.excludes)
    try:
        placement = await second.place(await snapshot(server, ws))
        assert (Path(placement.path) / "a.txt").read_text() == "version 1\n"
        placement.release()
    finally:
        second.close()
    assert walked_in and threading.main_thread() not in walked_in


async def _upload(channel: grpc.aio.Channel, *blobs: bytes) -> None:
    """Puts blobs in the server's CAS, as any holder of the worker token may."""
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    await cas.BatchUpdateBlobs(reapi.BatchUpdateBlobsRequest(requests=[
        reapi.BatchUpdateBlobsRequest.Request(digest=reapi.Digest(hash=Digest.of(b).hash, size_bytes=len(b)), data=b)
        for b in blobs
    ]))


def _victim(tmp_path: Path) -> Path:
    """The directory a hostile snapshot is placed for."""
    target = tmp_path / "victim"
    target.mkdir()
    return target


async def test_a_snapshot_naming_paths_outside_its_tree_is_refused(setup, tmp_path: Path) -> None:
    _, _, manager, channel = setup
    evil = reapi.Directory(files=[reapi.FileNode(name="../escaped.txt", digest=reapi.Digest(
        hash=Digest.of(b"x").hash, size_bytes=1))])
    blobs = [evil.SerializeToString(), b"x", b""]
    await _upload(channel, *(b for b in blobs if b))
    target = _victim(tmp_path)
    ref = SnapshotRef(str(target), Digest.of(blobs[0]), Digest.of(b""))
    with pytest.raises(WorkspaceUnavailable, match="malformed"):
        await manager.place(ref)
    assert not found(tmp_path, "escaped.txt")
    assert manager.holdings[str(target)].mode == "unavailable"


def _node(blob: bytes) -> reapi.Digest:
    return reapi.Digest(hash=Digest.of(blob).hash, size_bytes=len(blob))


@pytest.mark.parametrize("excluded", [".codelane/x", ".git/objects/pack"])
async def test_a_snapshot_naming_an_excluded_path_is_refused_before_anything_is_written(
    setup, tmp_path: Path, excluded: str
) -> None:
    # No scan puts an excluded path in a snapshot. Written, it stayed in the copy unseen by every
    # later scan (so the snapshots after it passed their check) and readable by the tools run
    # there; a symlink there (.codelane/x -> /outside) was the way a next one wrote outside.
    _, _, manager, channel = setup
    payload = b"planted\n"
    inner = reapi.Directory(files=[reapi.FileNode(name="planted", digest=_node(payload))]).SerializeToString()
    tree = inner
    parts = excluded.split("/")
    blobs = [inner]
    for name in reversed(parts):
        tree = reapi.Directory(directories=[reapi.DirectoryNode(name=name, digest=_node(tree))]).SerializeToString()
        blobs.append(tree)
    await _upload(channel, payload, *blobs)
    target = _victim(tmp_path)
    with pytest.raises(WorkspaceUnavailable, match=f"names '{excluded}', which its exclusions"):
        await manager.place(SnapshotRef(str(target), Digest.of(tree), Digest.of(b"")))
    assert found(Path(manager.cache_dir), "planted") == []


@pytest.mark.parametrize("through", ["directory", "file", "copy"])
def test_a_symlink_the_scan_does_not_see_is_never_written_through(setup, tmp_path: Path, through: str) -> None:
    # Where a symlink the scan does not see stands in a written path's place (a name that a
    # case-insensitive filesystem takes for another, which no plan check can rule out), the
    # worker made the directory through it (makedirs took the link for it), or opened the file
    # through it, and wrote outside its tree.
    manager = setup[2]
    outside = tmp_path / "outside"
    outside.mkdir()
    copy = tmp_path / "copy"
    copy.mkdir()
    tree = workspaces_module._Tree(path=str(copy), scanner=merkle.TreeScanner(str(copy), merkle.Exclusions()))
    payload = b"written through the link\n"
    digest = Digest.of(payload)
    plan = workspaces_module._Plan()
    if through == "directory":
        (copy / "X").symlink_to(outside)
        plan.mkdir.append("X")
        with pytest.raises(WorkspaceUnavailable, match="symlink"):
            manager._prepare(tree, plan, 0, set())
    else:
        (copy / "X").symlink_to(outside / "pwn")
        if through == "file":
            plan.writes[digest] = [("X", False, 0)]
            blob: bytes | workspaces_module.SpooledBlob = payload
        else:  # a spooled blob's first path takes the spool by a rename, its others are copies
            plan.writes[digest] = [("a", False, 0), ("X", False, 0)]
            spool = tmp_path / "spool"
            spool.write_bytes(payload)
            blob = workspaces_module.SpooledBlob(str(spool))
        with pytest.raises(WorkspaceUnavailable, match="symlink"):
            manager._write_batch(tree, plan, [(digest, blob)])
    assert list(outside.iterdir()) == []


def _a_thread_waits_to_open_a_fifo() -> bool:
    """Whether a thread of this process is blocked opening a FIFO for writing (no reader yet)."""
    for wchan in Path("/proc/self/task").glob("*/wchan"):
        with contextlib.suppress(OSError):
            if wchan.read_text() == "wait_for_partner":
                return True
    return False


async def test_a_sync_cancelled_while_its_thread_writes_ends_only_after_the_thread(setup) -> None:
    # A thread writing into a tree cannot be stopped: a cancelled sync must wait for it, or the
    # next sync would prepare the tree while it still writes there.
    ws, server, manager, _ = setup
    for i in range(40):  # more than a small move: written in a thread
        (ws / f"f{i:02d}.txt").write_text(f"file {i}\n")
    tree = Path(manager.slot, "trees", f"{hashlib.sha256(str(ws).encode()).hexdigest()[:16]}-0")
    os.makedirs(tree)
    fifo = tree / "f07.txt"
    os.mkfifo(fifo)  # the writer's open of it blocks until someone reads it
    placing = asyncio.create_task(manager.place(await snapshot(server, ws)))
    reader = None
    try:
        await poll_until(_a_thread_waits_to_open_a_fifo, what="the writer thread to wait for a reader of the FIFO")
        placing.cancel()
        for _ in range(50):  # loop turns, not time: ample for a sync that did not wait to end
            await asyncio.sleep(0)
        assert not placing.done()
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the thread's open returns, it writes on
        with pytest.raises(asyncio.CancelledError):
            await placing
        assert not _a_thread_waits_to_open_a_fifo()
        assert os.read(reader, 100) == b"file 7\n"  # the thread had finished its write
    finally:
        if reader is None:  # failed early: free the thread, or the process never exits
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.close(reader)


async def test_a_worker_killed_mid_write_leaves_nothing_its_successor_uses(setup, tmp_path: Path) -> None:
    # What a SIGKILL mid-sync leaves in the cache slot: a file of the copy cut short (written in
    # place), a second one missing, and a blob half-written under its temporary name. The next
    # worker on the slot rescans the copy from scratch (no stat cache survives) and rewrites what
    # differs; the temporary blob is never taken for the blob.
    _, server, _, channel = setup
    cache = str(tmp_path / "killed-cache")
    space = tmp_path / "space"
    space.mkdir()
    (space / "big.bin").write_bytes(b"b" * 300_000)
    (space / "small.txt").write_text("small\n")

    def worker() -> WorkspaceManager:
        manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=cache)
        manager.configure(CasClient(channel), server.snapshots.excludes)
        return manager

    first = worker()
    placement = await first.place(await snapshot(server, space))
    copy = Path(placement.path)
    placement.release()
    first.close()
    os.truncate(copy / "big.bin", 1000)
    (copy / "small.txt").unlink()
    blob = Digest.of(b"b" * 300_000)
    blobs = copy.parent.parent / "blobs" / blob.hash[:2]
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"{blob.hash}.tmp").write_bytes(b"b" * 10)

    second = worker()
    placement = await second.place(await snapshot(server, space))
    try:
        assert Path(placement.path) == copy
        assert (copy / "big.bin").read_bytes() == b"b" * 300_000
        assert (copy / "small.txt").read_text() == "small\n"
        assert blob.hash not in second.store or second.store.read(blob) == b"b" * 300_000
    finally:
        placement.release()
        second.close()


async def test_a_snapshot_whose_shared_subtrees_name_too_many_paths_is_refused_before_planning(
    setup, tmp_path: Path
) -> None:
    # Directory blobs form a DAG: 40 blobs of two entries, each naming the next level twice, name
    # 2^40 directories. The worker expanded them on its event loop (no heartbeat, no result, its
    # memory growing without bound) before any check of the snapshot's size.
    _, _, manager, channel = setup
    level = reapi.Directory()
    blobs = []
    for _ in range(40):
        blob = level.SerializeToString()
        blobs.append(blob)
        child = reapi.Digest(hash=Digest.of(blob).hash, size_bytes=len(blob))
        level = reapi.Directory(directories=[reapi.DirectoryNode(name="a", digest=child),
                                             reapi.DirectoryNode(name="b", digest=child)])
    root = level.SerializeToString()
    blobs.append(root)
    await _upload(channel, *(b for b in blobs if b))
    target = _victim(tmp_path)
    ref = SnapshotRef(str(target), Digest.of(root), Digest.of(b""))
    with pytest.raises(WorkspaceUnavailable, match="entries"):
        await asyncio.wait_for(manager.place(ref), 20)
    assert manager.holdings[str(target)].mode == "unavailable"


async def test_a_snapshot_nesting_directories_past_the_stack_is_refused_plainly(setup, tmp_path: Path) -> None:
    # A chain of 1,500 directories (1,500 small blobs) ran the planner out of stack: a
    # RecursionError, reported as a bug of the worker with its traceback.
    _, _, manager, channel = setup
    level = b""
    blobs = []
    for _ in range(1500):
        level = reapi.Directory(directories=[reapi.DirectoryNode(name="a", digest=_node(level))]).SerializeToString()
        blobs.append(level)
    for start in range(0, len(blobs), 500):
        await _upload(channel, *blobs[start:start + 500])
    target = _victim(tmp_path)
    with pytest.raises(WorkspaceUnavailable, match="nests directories deeper"):
        await manager.place(SnapshotRef(str(target), Digest.of(level), Digest.of(b"")))
    assert manager.holdings[str(target)].mode == "unavailable"


async def test_the_entries_a_directory_that_stays_gains_count_against_the_bound(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only new subtrees were counted: the root's own files (one Directory blob of up to 64 MiB,
    # 600,000 files) were written whatever the bound.
    _, _, manager, channel = setup
    monkeypatch.setattr(workspaces_module, "MAX_SNAPSHOT_ENTRIES", 10)
    root = reapi.Directory(files=[reapi.FileNode(name=f"f{i:03d}", digest=_node(b"x")) for i in range(50)])
    blob = root.SerializeToString()
    await _upload(channel, blob, b"x")
    target = _victim(tmp_path)
    with pytest.raises(WorkspaceUnavailable, match="more than 10 new entries"):
        await manager.place(SnapshotRef(str(target), Digest.of(blob), Digest.of(b"")))
    assert not found(Path(manager.slot), "f000")


class _EndlessByteStream(bytestream_pb2_grpc.ByteStreamServicer):
    """A CAS whose every stream goes on past the blob's size (up to `limit` chunks)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0

    async def Read(self, request, context):
        for _ in range(self.limit):
            self.sent += 1
            yield bytestream_pb2.ReadResponse(data=b"x" * STREAM_CHUNK)


async def test_a_cas_that_streams_past_a_blobs_size_is_cut_off(tmp_path: Path) -> None:
    # The worker kept every chunk a stream sent, and checked the digest only at its end: a CAS
    # streaming without end grew the worker's memory until it died.
    cas = _EndlessByteStream(limit=64)
    grpc_server = grpc.aio.server()
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(cas, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = CasClient(channel, max_batch_bytes=1024)
            with pytest.raises(ContentError, match="more than"):
                await client.read([Digest("a" * 64, 2 * STREAM_CHUNK)])
    finally:
        await grpc_server.stop(0)
    # The stream stops at the chunk that overran the size (and what flow control let through).
    assert cas.sent < 2 * 8


async def test_a_digest_of_size_0_with_another_hash_than_the_empty_blobs_is_fetched_and_missing(setup) -> None:
    # Any digest of size 0 was taken for the empty blob without asking the CAS: 0 bytes that do
    # not hash to it, used as a directory or written as a file.
    _, _, _, channel = setup
    bogus = Digest("ab" * 32, 0)
    client = CasClient(channel)
    assert await client.read([Digest.of(b"")]) == {Digest.of(b"").hash: b""}
    with pytest.raises(BlobMissing, match="is not held"):
        await client.read([bogus])


async def test_a_snapshot_naming_a_file_of_size_0_that_is_not_empty_is_snapshot_changed(
    setup, tmp_path: Path
) -> None:
    _, _, manager, channel = setup
    root = reapi.Directory(files=[reapi.FileNode(name="ghost", digest=reapi.Digest(hash="ab" * 32))])
    times = workspace_pb2.DirectoryTimes(files=[workspace_pb2.FileTime(name="ghost", mtime_ns=10**18)])
    await _upload(channel, root.SerializeToString(), times.SerializeToString())
    target = _victim(tmp_path)
    with pytest.raises(SnapshotChanged, match="is not held"):
        await manager.place(SnapshotRef(str(target), Digest.of(root.SerializeToString()),
                                        Digest.of(times.SerializeToString())))


async def test_a_snapshot_with_a_negative_file_size_is_refused_before_any_fetch(setup, tmp_path: Path) -> None:
    # Sizes count against --cache-size as they are planned: a file "of -1 TiB" beside one of
    # 1 TiB made the snapshot look empty, and the worker went on to fetch the terabyte, held in
    # memory whole before it is checked.
    _, _, manager, channel = setup
    huge = 1 << 40
    evil = reapi.Directory(files=[
        reapi.FileNode(name="big", digest=reapi.Digest(hash="b" * 64, size_bytes=huge)),
        reapi.FileNode(name="negative", digest=reapi.Digest(hash="c" * 64, size_bytes=-huge)),
    ]).SerializeToString()
    await _upload(channel, evil)
    target = _victim(tmp_path)
    with pytest.raises(WorkspaceUnavailable, match="malformed"):
        await manager.place(SnapshotRef(str(target), Digest.of(evil), Digest.of(b"")))
    assert manager.holdings[str(target)].mode == "unavailable"


@pytest.mark.parametrize("where", ["root", "child"])
async def test_a_directory_blob_claimed_bigger_than_any_directory_is_refused_before_its_fetch(
    setup, tmp_path: Path, where: str
) -> None:
    # Directory blobs are fetched whole into memory before they are checked, and no --cache-size
    # counts them: a directory "of 1 TiB" was streamed for as long as the CAS cared to send.
    _, _, manager, channel = setup
    claimed = Digest("d" * 64, 1 << 40)
    parent = reapi.Directory(directories=[reapi.DirectoryNode(
        name="sub", digest=reapi.Digest(hash=claimed.hash, size_bytes=claimed.size))]).SerializeToString()
    await _upload(channel, parent)
    target = _victim(tmp_path)
    root = claimed if where == "root" else Digest.of(parent)
    with pytest.raises(WorkspaceUnavailable, match="larger than"):
        await manager.place(SnapshotRef(str(target), root, Digest.of(b"")))


async def test_directory_blobs_past_their_total_bound_are_refused_before_their_fetch(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each directory blob was bounded, not their sum: one level of distinct directories (a
    # thousand of 64 MiB, each one long name) was fetched and held whole in memory before the
    # entry count or any other check. Here the children are not even in the CAS: refused before
    # they are asked for, not SnapshotChanged.
    _, _, manager, channel = setup
    monkeypatch.setattr(workspaces_module, "MAX_SNAPSHOT_DIRECTORY_BYTES", 100_000)
    root = reapi.Directory(directories=[
        reapi.DirectoryNode(name=f"d{i:02d}", digest=reapi.Digest(hash=f"{i:02d}" * 32, size_bytes=10_000))
        for i in range(20)
    ]).SerializeToString()
    await _upload(channel, root)
    target = _victim(tmp_path)
    with pytest.raises(WorkspaceUnavailable, match="directory blobs take more than") as refused:
        await manager.place(SnapshotRef(str(target), Digest.of(root), Digest.of(b"")))
    assert not isinstance(refused.value, SnapshotChanged)


async def test_a_snapshot_with_an_exclusion_pattern_rule_2_calls_invalid_is_refused_not_guessed(setup) -> None:
    # workspace.proto, rule 2: the server sends no invalid pattern; a worker given one runs
    # nothing on that snapshot and says which pattern (not SNAPSHOT_CHANGED: a newer snapshot of
    # the workspace would carry it too).
    ws, server, manager, _ = setup
    good = await snapshot(server, ws)
    bad = SnapshotRef(good.workspace, good.digest, good.times_digest, ("/abs",))
    with pytest.raises(WorkspaceUnavailable, match="'/abs' begins with '/'") as refused:
        await manager.place(bad)
    assert not isinstance(refused.value, SnapshotChanged)
    placement = await manager.place(good)  # the worker stays usable
    placement.release()


# -- exclusions that change ----------------------------------------------------------------------

async def _restarted(tmp_path: Path, name: str, ws: Path, **config):
    """A server started (again) with `config`, a channel to it, and the current snapshot of `ws`
    as a worker's Assign names it (its own exclusions with it)."""
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / name, **config))
    await server.start()
    snapshots = server.snapshots.of(str(ws))
    snapshots.changed()
    current = await snapshots.current()
    ref = SnapshotRef(str(ws), current.digest, current.times_digest, current.exclude)
    return server, grpc.aio.insecure_channel(server.address), ref


def _stale_workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "build").mkdir(parents=True)
    (ws / "secrets").mkdir()
    (ws / "main.py").write_text("print('hi')\n")
    (ws / "build" / "out.txt").write_text("old build\n")
    (ws / "secrets" / "key.pem").write_text("old secret\n")
    return ws


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


NEW_EXCLUSIONS = {"snapshot_excludes": [".git/objects/**", ".codelane/**", "build/**"]}


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "read-while-they-changed"])
async def test_exclusions_that_change_leave_nothing_they_exclude_in_the_copy(tmp_path: Path, busy: bool) -> None:
    # The server restarts with a new --snapshot-exclude and a --sandbox-deny-read inside the
    # workspace: the copy holds what the new snapshots leave out. It must go (docs/workspaces.md:
    # a synced worker's copy lacks denied files), not stay, stale or secret, for grep to find;
    # a tree read while the exclusions changed gets the same at its next move.
    ws = _stale_workspace(tmp_path)
    manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "cache"))
    first, channel, ref = await _restarted(tmp_path, "data1", ws)
    manager.configure(CasClient(channel), first.snapshots.excludes)
    reading = await manager.place(ref)
    copy = Path(reading.path)
    assert (copy / "secrets" / "key.pem").exists()
    if not busy:
        reading.release()
    await channel.close()
    await first.stop(grace=0.5)
    (ws / "build" / "out.txt").write_text("new build\n")
    second, channel, ref = await _restarted(tmp_path, "data2", ws, sandbox_deny_read=[ws / "secrets"],
                                            **NEW_EXCLUSIONS)
    try:
        manager.configure(CasClient(channel), second.snapshots.excludes)
        placement = await manager.place(ref)
        if busy:
            # A second tree was built meanwhile; the first one moves once released, while the
            # second is read.
            assert Path(placement.path) != copy
            assert _files(Path(placement.path)) == ["main.py"]
            reading.release()
            (ws / "main.py").write_text("print('bye')\n")
            second.snapshots.of(str(ws)).changed()
            current = await second.snapshots.of(str(ws)).current()
            moved = await manager.place(SnapshotRef(str(ws), current.digest, current.times_digest, current.exclude))
            placement.release()
            placement = moved
        assert Path(placement.path) == copy
        assert _files(copy) == ["main.py"]
        assert not (copy / "secrets").exists()
        placement.release()
    finally:
        manager.close()
        await channel.close()
        await second.stop(grace=0.5)


async def test_a_copy_an_earlier_worker_left_loses_what_the_exclusions_of_today_leave_out(tmp_path: Path) -> None:
    # Server and worker both restarted: the copy the earlier worker left is reused, without the
    # paths the new exclusions leave out.
    ws = _stale_workspace(tmp_path)
    first, channel, ref = await _restarted(tmp_path, "data1", ws)
    earlier = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "cache"))
    earlier.configure(CasClient(channel), first.snapshots.excludes)
    placement = await earlier.place(ref)
    copy = Path(placement.path)
    placement.release()
    earlier.close()
    await channel.close()
    await first.stop(grace=0.5)
    second, channel, ref = await _restarted(tmp_path, "data2", ws, sandbox_deny_read=[ws / "secrets"],
                                            **NEW_EXCLUSIONS)
    manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "cache"))
    try:
        manager.configure(CasClient(channel), second.snapshots.excludes)
        placement = await manager.place(ref)
        assert Path(placement.path) == copy
        assert _files(copy) == ["main.py"]
        placement.release()
    finally:
        manager.close()
        await channel.close()
        await second.stop(grace=0.5)


async def test_a_sync_cancelled_while_its_thread_prepares_the_tree_releases_it_only_after_the_thread(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread removing old versions (a large rmtree, many renames) ran on after its sync was
    # cancelled (the hub's Cancel at the call's deadline), the tree already marked idle: the retry
    # prepared it beside that thread and failed on the files it moved away.
    ws, server, manager, _ = setup
    for i in range(40):  # more than a small move: prepared in a thread
        (ws / f"f{i:02d}.txt").write_text(f"file {i}\n")
    (await manager.place(await snapshot(server, ws))).release()
    for i in range(40):
        (ws / f"f{i:02d}.txt").write_text(f"file {i}, edited\n")
    target = await snapshot(server, ws)
    original = WorkspaceManager._prepare
    entered, proceed = threading.Event(), threading.Event()
    running = []

    def held_prepare(self, tree, plan, *arguments):
        running.append(tree)
        assert len(running) == 1, "two threads prepare one tree"
        entered.set()
        proceed.wait(30)
        try:
            return original(self, tree, plan, *arguments)
        finally:
            running.remove(tree)

    monkeypatch.setattr(WorkspaceManager, "_prepare", held_prepare)
    placing = asyncio.create_task(manager.place(target))
    try:
        await asyncio.to_thread(entered.wait, 30)
        placing.cancel()
        for _ in range(50):  # loop turns, not time: ample for a sync that did not wait to end
            await asyncio.sleep(0)
        assert not placing.done()
        tree = next(iter(manager._workspaces[str(ws)].trees))
        assert tree.writing and not tree.idle
    finally:
        proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await placing
    assert not running
    placement = await manager.place(target)  # the retry, on the same worker
    assert (Path(placement.path) / "f07.txt").read_text() == "file 7, edited\n"
    placement.release()


async def test_a_big_move_plans_writes_and_checks_off_the_event_loop(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker's event loop carries its heartbeats (every 2 s, missed after 6 s). Syncing 200,000
    # files stalled it for 3-6 s: the plan was made on it, a times-only move (every mtime changed)
    # passed for a small one, and the check rescan of one huge directory passed for cheap.
    ws, server, manager, _ = setup
    for i in range(2_000):
        (ws / f"file-{i:05d}.txt").write_text(f"{i}\n")
    on_loop: list[str] = []

    def spied(name, function):
        def wrapper(*arguments, **keywords):
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            return function(*arguments, **keywords)
        return wrapper

    monkeypatch.setattr(workspaces_module, "_plan", spied("plan", workspaces_module._plan))
    monkeypatch.setattr(WorkspaceManager, "_finish", spied("finish", WorkspaceManager._finish))
    placement = await manager.place(await snapshot(server, ws))
    copy = placement.path
    placement.release()
    assert on_loop == []  # the plan of 2,000 new files
    scan = workspaces_module.TreeScanner.scan

    def spied_scan(self, **keywords):
        tree = scan(self, **keywords)
        # A watched rescan that lists nothing may run on the loop; one listing 2,000 entries not.
        if self.root == copy and self.last_listed and threading.current_thread() is threading.main_thread():
            on_loop.append("scan")
        return tree

    monkeypatch.setattr(workspaces_module.TreeScanner, "scan", spied_scan)
    later = time.time_ns()
    for i in range(2_000):  # a times-only move: 2,000 utimes, no content
        os.utime(ws / f"file-{i:05d}.txt", ns=(later, later))
    placement = await manager.place(await snapshot(server, ws))
    assert os.stat(Path(placement.path) / "file-01999.txt").st_mtime_ns == later
    placement.release()
    assert "finish" not in on_loop and "scan" not in on_loop, on_loop


async def test_a_rescan_with_a_huge_file_to_hash_leaves_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rescan of a few changed entries runs on the loop, as cheap; one of them may be huge. A
    # model's `truncate -s 8G f` (no disk used) had a worker hash 8 GB on its loop: its heartbeats
    # stopped, the hub dropped it as lost and sent its call elsewhere, where the same happened.
    (tmp_path / "small.txt").write_text("small\n")
    scanner = workspaces_module.TreeScanner(str(tmp_path))
    scanner.scan()
    with (tmp_path / "big.bin").open("wb") as handle:
        handle.truncate(workspaces_module.CHEAP_SCAN_BYTES + 1)
    await poll_until(lambda: scanner.pending(), what="the watch to see the new file")
    hashed_on_loop: list[str] = []
    hash_file = merkle.hash_file

    def spied(path, *arguments, **keywords):
        if threading.current_thread() is threading.main_thread():
            hashed_on_loop.append(os.fsdecode(path))
        return hash_file(path, *arguments, **keywords)

    monkeypatch.setattr(merkle, "hash_file", spied)
    tree = await workspaces_module._scan(scanner)
    assert str(tmp_path / "big.bin") not in hashed_on_loop
    assert tree.file_count == 2 and tree.total_bytes == workspaces_module.CHEAP_SCAN_BYTES + 7
    assert tree.digest == workspaces_module.TreeScanner(str(tmp_path), watch=False).scan().digest


async def test_a_rescan_with_a_huge_file_to_hash_lists_only_what_changed(tmp_path: Path) -> None:
    # Moved to a thread, the rescan of a few changed entries with one big file (a log a command
    # appends to, past 4 MiB) listed the whole tree again: the events it took were dropped, so
    # every call after such a change cost a full listing of the workspace, however large.
    for i in range(20):
        (tmp_path / f"dir-{i:02d}").mkdir()
        (tmp_path / f"dir-{i:02d}" / "a.txt").write_text("a\n")
    scanner = workspaces_module.TreeScanner(str(tmp_path))
    scanner.scan()
    with (tmp_path / "dir-00" / "big.log").open("wb") as handle:
        handle.truncate(workspaces_module.CHEAP_SCAN_BYTES + 1)
    await poll_until(lambda: scanner.pending(), what="the watch to see the new file")
    tree = await workspaces_module._scan(scanner)
    assert scanner.last_listed <= 2, scanner.last_listed  # dir-00 (and the root holding it)
    assert tree.digest == workspaces_module.TreeScanner(str(tmp_path), watch=False).scan().digest
