"""The worker's synced trees against a real server's content service: a call never runs on a
tree that is moving, two snapshots wanted at once get two trees, and a malformed tree is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from codelane.reapi import remote_execution_pb2 as reapi
from codelane.reapi import remote_execution_pb2_grpc
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.cas import CasClient
from tool_worker.merkle import Digest, SnapshotRef
from tool_worker.workspaces import WorkspaceManager, WorkspaceUnavailable


def found(root: Path, name: str) -> list[Path]:
    return list(root.rglob(name))


@pytest.fixture
async def setup(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("version 1\n")
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data"))
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    manager = WorkspaceManager(roots=(str(tmp_path / "elsewhere"),), cache_dir=str(tmp_path / "cache"))
    manager.configure(CasClient(channel), server.snapshots.excludes)
    yield ws, server, manager, channel
    manager.close()
    await channel.close()
    await server.stop(grace=0.5)


async def snapshot(server: CodelaneServer, ws: Path) -> SnapshotRef:
    snapshots = server.snapshots.of(str(ws))
    snapshots.changed()
    current = await snapshots.current()
    return SnapshotRef(str(ws), current.digest, current.times_digest)


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


async def test_a_snapshot_naming_paths_outside_its_tree_is_refused(setup, tmp_path: Path) -> None:
    _, _, manager, channel = setup
    evil = reapi.Directory(files=[reapi.FileNode(name="../escaped.txt", digest=reapi.Digest(
        hash=Digest.of(b"x").hash, size_bytes=1))])
    blobs = [evil.SerializeToString(), b"x", b""]
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    await cas.BatchUpdateBlobs(reapi.BatchUpdateBlobsRequest(requests=[
        reapi.BatchUpdateBlobsRequest.Request(digest=reapi.Digest(hash=Digest.of(b).hash, size_bytes=len(b)), data=b)
        for b in blobs if b
    ]))
    target = tmp_path / "victim"
    target.mkdir()
    ref = SnapshotRef(str(target), Digest.of(blobs[0]), Digest.of(b""))
    with pytest.raises(WorkspaceUnavailable, match="malformed"):
        await manager.place(ref)
    assert not found(tmp_path, "escaped.txt")
    assert manager.holdings[str(target)].mode == "unavailable"
