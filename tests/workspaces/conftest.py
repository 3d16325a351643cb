"""Fixtures of the workspace tests: the pool's real-process harness (servers, worker processes),
and an in-process server with a worker's WorkspaceManager syncing from its content service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from session_server.server import CodelaneServer, ServerConfig
from tests.pool.conftest import make_server, workers
from tool_worker.cas import CasClient
from tool_worker.merkle import SnapshotRef
from tool_worker.workspaces import WorkspaceManager

__all__ = ["make_server", "setup", "snapshot", "workers"]


@pytest.fixture
async def setup(tmp_path: Path):
    """(workspace holding a.txt, server, a manager whose roots exclude the workspace: it syncs,
    the manager's channel)."""
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
    """The workspace's snapshot now, as a call would name it."""
    snapshots = server.snapshots.of(str(ws))
    snapshots.changed()
    current = await snapshots.current()
    return SnapshotRef(str(ws), current.digest, current.times_digest)
