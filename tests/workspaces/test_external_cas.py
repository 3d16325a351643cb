"""`codelane server --cas ADDR` against a real BuildGrid CAS: the server uploads each snapshot
there, and a worker that must sync fetches from there (the server then serves no CAS itself).
Needs the `buildgrid` extra (its `bgd` beside this Python); skipped with the reason otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from codelane.reapi import remote_execution_pb2, remote_execution_pb2_grpc
from session_server.pool import QueryCall
from tests.pool.conftest import wait_for
from tool_worker.merkle import SnapshotRef

BGD = os.environ.get("CODELANE_BGD") or shutil.which("bgd", path=os.path.dirname(sys.executable))

pytestmark = pytest.mark.skipif(
    BGD is None,
    reason="BuildGrid is not installed: pip install -e '.[buildgrid]' (0.9.1 needs Python >= 3.13, 0.4.4 "
    "serves older ones), or point CODELANE_BGD at a `bgd`",
)

CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
storages:
  - !lru-storage &cas
    size: 256MB
instances:
  - name: 'codelane'
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def buildgrid(tmp_path: Path):
    port = free_port()
    config = tmp_path / "bgd.yml"
    config.write_text(CONFIG.format(port=port))
    process = await asyncio.to_thread(subprocess.Popen, [BGD, "server", "start", str(config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), 60)
        yield f"grpc://127.0.0.1:{port}", channel
    finally:
        await channel.close()
        process.kill()
        process.wait()
        process.stderr.close()


async def test_snapshots_go_through_an_external_buildgrid_cas(buildgrid, make_server, workers, tmp_path: Path) -> None:
    address, channel = buildgrid
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('from buildgrid')\n")
    (ws / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))  # over a batch: a ByteStream upload and read
    (tmp_path / "root").mkdir()
    server = await make_server(cas=address, cas_instance="codelane", data_dir=tmp_path / "data")
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "root"),))  # outside its root: it syncs
    await wait_for(lambda: server.pool.workers(), what="the worker")
    current = await server.snapshots.of(str(ws)).current()
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    root = remote_execution_pb2.Digest(hash=current.digest.hash, size_bytes=current.digest.size)
    missing = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
        instance_name="codelane", blob_digests=[root]))
    assert not missing.missing_blob_digests, "the snapshot was uploaded before any call named it"
    for file_path, expected in (("src/app.py", "from buildgrid"), (str(ws / "big.bin"), "binary file")):
        result = await server.pool.dispatch(QueryCall(
            session_id="s", call_id="c", tool_name="read", workspace=str(ws),
            arguments_json=json.dumps({"file_path": file_path}),
            snapshot=SnapshotRef(str(ws), current.digest, current.times_digest),
        ))
        assert not result.is_error and expected in result.output, result.output
    assert server.pool.worker("w1").workspaces[str(ws)].mode == "synced"
    async with grpc.aio.insecure_channel(server.address) as own:  # the server serves no CAS itself
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await remote_execution_pb2_grpc.ContentAddressableStorageStub(own).FindMissingBlobs(
                remote_execution_pb2.FindMissingBlobsRequest())
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
