"""Server snapshots (a rescan per change, off the loop) and the worker's pieces: path mapping,
the blob store, sizes."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from session_server import snapshots as snapshots_module
from session_server.snapshots import KEEP_SNAPSHOTS, SnapshotRegistry
from tests.polling import poll_until
from tool_worker.blobstore import BlobStore
from tool_worker.confinement.policy import SandboxSettings
from tool_worker.confinement.protected import operator_denied_inside
from tool_worker.merkle import BLOCK_BYTES, DEFAULT_EXCLUDES, Digest, digest_of, disk_bytes
from tool_worker.tools.base import ToolResult
from tool_worker.workspaces import Placement


async def test_entries_left_out_are_said_once_and_remembered_within_a_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every entry ever left out was remembered (so as to warn once) for as long as the server kept
    # the workspace: a workspace whose commands make sockets or fifos under new names grew it for
    # ever. Past the bound, what the last snapshot left out is what is remembered.
    monkeypatch.setattr(snapshots_module, "MAX_SKIPPED_REMEMBERED", 10, raising=False)
    os.mkfifo(tmp_path / "kept.fifo")
    registry = SnapshotRegistry()
    snapshots = registry.of(str(tmp_path))
    try:
        with caplog.at_level("WARNING", logger=snapshots_module.__name__):
            for number in range(30):
                # A command's run: its fifo, and its output (the snapshot changes, and is reported).
                os.mkfifo(tmp_path / f"run{number}.fifo")
                (tmp_path / "out.txt").write_text(f"run {number}\n")
                snapshots.changed()
                await snapshots.current()
                os.unlink(tmp_path / f"run{number}.fifo")
                (tmp_path / "out.txt").write_text(f"run {number} done\n")
                snapshots.changed()
                await snapshots.current()
        assert len(snapshots._skipped_reported) <= 10
        warnings = [r.getMessage() for r in caplog.records if "left out of its snapshot" in r.getMessage()]
        assert sum("kept.fifo" in w for w in warnings) == 1
        assert sum("run7.fifo" in w for w in warnings) == 1
    finally:
        registry.close()


async def test_current_sees_every_change_announced_before_it(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n")
    registry = SnapshotRegistry()
    snapshots = registry.of(str(tmp_path))
    try:
        first = await snapshots.current()
        assert first.digest == digest_of(str(tmp_path)).digest
        assert await snapshots.current() is first  # nothing announced: no rescan
        (tmp_path / "a.txt").write_text("two\n")
        snapshots.changed()
        (tmp_path / "b.txt").write_text("during the scan\n")  # announced while a scan may run
        snapshots.changed()
        second = await snapshots.current()
        assert second.digest == digest_of(str(tmp_path)).digest != first.digest
        assert second.file_path(Digest.of(b"two\n").hash) == str(tmp_path / "a.txt")
        blob, paths = registry.find(Digest.of(b"one\n").hash)  # the older snapshot is still named
        assert blob is None and paths == [str(tmp_path / "a.txt")]
        assert registry.find(second.digest.hash)[0] is not None
    finally:
        registry.close()


async def test_current_waits_for_one_scan_not_for_the_changes_to_stop(tmp_path: Path) -> None:
    # Each scan is followed by another while changes keep being announced (other sessions' writes
    # on the workspace): current() waited for the scans to stop, so a flood of writes by one
    # session held another session's worker-bound calls until their deadlines.
    registry = SnapshotRegistry()
    snapshots = registry.of(str(tmp_path))
    loop = asyncio.get_running_loop()
    scans = 0
    churning = 500  # scans followed by another: far more than current() needs to wait for
    scan = snapshots._scanner.scan

    def scan_beside_a_write(*args, **kwargs):
        nonlocal scans
        scans += 1
        try:
            return scan(*args, **kwargs)
        finally:
            if scans < churning:  # a write ends while this scan runs
                (tmp_path / "hot.txt").write_text(f"{scans}\n")
                loop.call_soon_threadsafe(snapshots.changed)

    snapshots._scanner.scan = scan_beside_a_write
    try:
        await snapshots.current()
        (tmp_path / "mine.txt").write_text("mine\n")
        snapshots.changed()
        latest = await snapshots.current()
        assert scans < churning, "current() waited for the changes to stop"
        assert latest.file_path(Digest.of(b"mine\n").hash) == str(tmp_path / "mine.txt")
    finally:
        registry.close()


def _read_position(path: Path) -> int | None:
    """How far this process has read into `path` through a descriptor open on it, or None."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    return int(next(line for line in info if line.startswith("pos:")).split()[1])
        except (OSError, StopIteration):
            continue
    return None


async def test_closing_a_workspace_stops_the_scan_hashing_it(tmp_path: Path) -> None:
    # A sparse TiB takes minutes to hash on any machine: a scan of it held a thread that long,
    # and a workspace of /proc (kcore) for ever, whoever still needed it.
    huge = tmp_path / "huge.img"
    huge.touch()
    os.truncate(huge, 1 << 40)
    registry = SnapshotRegistry()
    snapshots = registry.of(str(tmp_path))
    snapshots.changed()
    await poll_until(lambda: (_read_position(huge) or 0) > 64 << 20, what="the scan to read into the file")
    registry.close()
    await poll_until(lambda: _read_position(huge) is None, what="the scan to stop and close the file", within=60)


async def test_only_the_last_snapshots_are_kept(tmp_path: Path) -> None:
    registry = SnapshotRegistry()
    snapshots = registry.of(str(tmp_path))
    try:
        for i in range(KEEP_SNAPSHOTS + 3):
            (tmp_path / "f.txt").write_text(f"version {i}\n")
            snapshots.changed()
            await snapshots.current()
        assert len(snapshots.recent) == KEEP_SNAPSHOTS
        assert registry.find(Digest.of(b"version 0\n").hash) == (None, [])
    finally:
        registry.close()


async def test_an_unreadable_workspace_raises(tmp_path: Path) -> None:
    registry = SnapshotRegistry()
    try:
        with pytest.raises(OSError):
            await registry.of(str(tmp_path / "missing")).current()
    finally:
        registry.close()


def test_paths_are_mapped_in_path_arguments_and_back_everywhere() -> None:
    placement = Placement("/srv/ws", "/cache/trees/abc-0")
    mapped = placement.arguments('{"file_path": "/srv/ws/a.py", "pattern": "/srv/ws/a.py", "paths": ["/srv/ws"],'
                                 ' "path": "/srv/wsx/a"}')
    assert mapped == ('{"file_path": "/cache/trees/abc-0/a.py", "pattern": "/srv/ws/a.py", '
                      '"paths": ["/cache/trees/abc-0"], "path": "/srv/wsx/a"}')
    copy = "/cache/trees/abc-0"
    result = placement.result(ToolResult(f"file not found: {copy}/b.py", metadata={"p": copy}))
    assert result.output == "file not found: /srv/ws/b.py" and result.metadata == {"p": "/srv/ws"}
    shared = Placement("/srv/ws", "/srv/ws")
    same = ToolResult("x")
    assert shared.arguments('{"path": "/srv/ws"}') == '{"path": "/srv/ws"}' and shared.result(same) is same


def test_path_mapping_follows_worker_proto_to_the_byte() -> None:
    """Assign.workspace's rule: the decoded strings of path members, W or under W + "/" only."""
    copy = "/cache/trees/abc-0"
    placement = Placement("/srv/ws", copy)
    # A prefix that is not a directory of W, a relative path, a member not named for paths and
    # an object inside a path member stay as they are; arrays are mapped at any depth.
    kept = '{"path": "/srv/ws2/a", "paths": ["src/a.py", [["/srv/ws/b"]]], "file_path": {"p": "/srv/ws"}}'
    assert json.loads(placement.arguments(kept)) == {
        "path": "/srv/ws2/a", "paths": ["src/a.py", [[f"{copy}/b"]]], "file_path": {"p": "/srv/ws"}}
    assert placement.arguments('{"pattern": "/srv/ws/a"}') == '{"pattern": "/srv/ws/a"}'
    # Matching is on the decoded string: a model may escape `/` or write non-ASCII as \u escapes.
    # The raw text held no "/srv/ws", and the path went through unmapped (PATH_ESCAPE on the copy).
    assert json.loads(placement.arguments(r'{"file_path": "\/srv\/ws\/a.py"}')) == {"file_path": f"{copy}/a.py"}
    accented = Placement("/srv/caf\u00e9", copy)
    assert json.loads(accented.arguments(r'{"path": "/srv/caf\u00e9/x"}')) == {"path": f"{copy}/x"}
    # A name that only ends in "path" is not a path member; one that ends in "_path" is.
    assert json.loads(placement.arguments('{"xpath": "/srv/ws", "base_path": "/srv/ws"}')) == {
        "xpath": "/srv/ws", "base_path": copy}
    # The server's workspace may be "/": every absolute path is under it.
    root = Placement("/", copy)
    assert json.loads(root.arguments('{"path": "/etc/x", "paths": ["/"]}')) == {"path": f"{copy}/etc/x",
                                                                                "paths": [copy]}
    assert root.result(ToolResult(f"{copy}/etc/x and {copy}")).output == "/etc/x and /"
    # A relative path that climbs out of W and back in by W's names loses the detour: on the
    # copy, whose name differs, it led out of it (PATH_ESCAPE where the server read the file).
    detours = '{"file_path": "../ws/src/a.py", "path": "../../srv/ws", "paths": ["../other/a", "../wsx", ".."]}'
    assert json.loads(placement.arguments(detours)) == {
        "file_path": "src/a.py", "path": ".", "paths": ["../other/a", "../wsx", ".."]}
    assert json.loads(root.arguments('{"path": "../../etc/x"}')) == {"path": "etc/x"}  # `..` of `/` is `/`
    # Back: every string of the metadata, names included, whatever its characters (a cache
    # under a home directory named with an accent was not mapped back).
    home = Placement("/srv/ws", "/home/jos\u00e9/.cache/t-0")
    result = home.result(ToolResult("see /home/jos\u00e9/.cache/t-0/a", metadata={
        "/home/jos\u00e9/.cache/t-0": ["/home/jos\u00e9/.cache/t-0/a", 3]}))
    assert result.output == "see /srv/ws/a" and result.metadata == {"/srv/ws": ["/srv/ws/a", 3]}


def test_the_blob_store_verifies_every_blob_it_gives_and_evicts_the_least_recent(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "blobs"))
    a, b = b"a" * 100, b"b" * 100
    store.put(Digest.of(a), a)
    store.put(Digest.of(b), b)
    assert store.read(Digest.of(a)) == a  # a is now the most recent
    Path(store.path(Digest.of(b).hash)).write_bytes(b"c" * 100)
    assert store.read(Digest.of(b)) is None and store.corrupt_discarded == 1
    assert Digest.of(b).hash not in store
    store.put(Digest.of(b), b)
    assert store.bytes == 2 * BLOCK_BYTES  # whole blocks, as the disk gives them
    store.evict(BLOCK_BYTES)
    assert Digest.of(a).hash not in store and store.read(Digest.of(b)) == b
    assert BlobStore(str(tmp_path / "blobs")).bytes == BLOCK_BYTES  # what a restarted worker finds


def test_the_blob_store_gives_0_bytes_only_for_the_empty_blob(tmp_path: Path) -> None:
    # Any digest of size 0 was answered with 0 bytes, whatever its hash.
    store = BlobStore(str(tmp_path / "blobs"))
    held = b"h" * 100
    store.put(Digest.of(held), held)
    assert store.read(Digest.of(b"")) == b""
    assert store.read(Digest(Digest.of(held).hash, 0)) is None


def test_a_blob_half_written_by_a_killed_worker_is_removed_when_the_store_opens(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "blobs"))
    kept, cut = b"k" * 100, b"c" * 5_000
    store.put(Digest.of(kept), kept)
    leftover = Path(f"{store.path(Digest.of(cut).hash)}.tmp")
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(cut[:3_000])  # `put` killed before its rename
    reopened = BlobStore(str(tmp_path / "blobs"))
    assert reopened.bytes == BLOCK_BYTES and not leftover.exists()
    assert reopened.read(Digest.of(kept)) == kept and Digest.of(cut).hash not in reopened



async def test_a_workspaces_own_exclusions_leave_its_denied_paths_out_of_every_snapshot(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("public\n")
    (tmp_path / "secret.txt").write_text("private\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "events.db").write_text("history\n")
    registry = SnapshotRegistry(workspace_excludes=lambda workspace: ("secret.txt", "data"))
    try:
        current = await registry.of(str(tmp_path)).current()
        assert current.ref.exclude == ("secret.txt", "data")
        with_them = digest_of(str(tmp_path))
        without = digest_of(str(tmp_path), (*DEFAULT_EXCLUDES, "secret.txt", "data"))
        assert current.digest == without.digest != with_them.digest
        for content in (b"private\n", b"history\n"):
            assert registry.find(Digest.of(content).hash) == (None, [])
        assert registry.find(Digest.of(b"public\n").hash) == (None, [str(tmp_path / "a.txt")])
    finally:
        registry.close()


def test_the_operators_deny_list_inside_a_workspace_is_named_relative_to_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "deploy").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(ws)
    settings = SandboxSettings(deny_read=(ws / "deploy" / "key.pem", ws / "data", tmp_path, tmp_path / "elsewhere",
                                          ws / "data"))
    # Through a symbolic link to the workspace, the same paths; the denied directory above the
    # workspace and the path outside it are not the workspace's to leave out.
    assert operator_denied_inside(settings, str(ws)) == ("deploy/key.pem", "data")
    assert operator_denied_inside(settings, str(link)) == ("deploy/key.pem", "data")


async def test_a_workspace_a_turn_holds_stays_open_however_many_others_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots_module, "MAX_WORKSPACES", 2)
    roots = []
    for name in ("held", "a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(name)
        roots.append(str(tmp_path / name))
    held_root, *others = roots
    registry = SnapshotRegistry()
    try:
        held = registry.of(held_root, hold=True)
        unheld = [registry.of(root) for root in others]
        # The held one outlived three newer workspaces; the least recent unheld one went.
        assert (await held.current()).digest == digest_of(held_root).digest
        for gone in unheld[:2]:
            with pytest.raises(OSError, match="stopped"):
                await gone.current()
        assert (await unheld[2].current()).digest == digest_of(others[2]).digest
        held.changed()
        assert (await held.current()).digest == digest_of(held_root).digest
        registry.release(held_root)
        registry.of(others[0])
        held.changed()
        with pytest.raises(OSError, match="stopped"):  # released, it goes like any other
            await held.current()
    finally:
        registry.close()


def test_the_blob_store_shared_by_threads_keeps_its_count(tmp_path: Path) -> None:
    # The syncs of two workspaces run in threads of their own and share the store: blobs moved
    # in by some while others evict and read.
    store = BlobStore(str(tmp_path / "blobs"))
    contents = [f"blob {i}\n".encode() * (i % 7 + 1) for i in range(200)]
    digests = [Digest.of(data) for data in contents]
    failures: list[BaseException] = []

    def mover(offset: int) -> None:
        try:
            for round_ in range(30):
                for i in range(offset, len(contents), 4):
                    source = tmp_path / f"in-{offset}-{round_}-{i}"
                    source.write_bytes(contents[i])
                    store.take_in(str(source), digests[i], budget=40 * 4096)
                    store.read(digests[(i * 7) % len(digests)])
                store.evict(20 * 4096)
        except BaseException as exc:  # reported by the test, not lost in its thread
            failures.append(exc)

    threads = [threading.Thread(target=mover, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    held = {digest.hash: digest.size for digest in digests if digest.hash in store}
    assert store.bytes == sum(disk_bytes(size) for size in held.values())
    assert all(os.path.exists(store.path(hash_hex)) for hash_hex in held)
