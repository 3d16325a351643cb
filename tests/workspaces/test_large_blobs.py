"""Large files on synced workers: a blob too big for a batch streams to a file in the worker's
cache as it arrives (checked on the way), so a model's weights cost disk, not memory; a stream has
no deadline as a whole, only for each message; and no spooled file outlives its sync."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import tracemalloc
from pathlib import Path

import grpc
import pytest

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc
from session_server.content import STREAM_CHUNK
from session_server.external_cas import ExternalCas, ExternalCasError
from tests.workspaces.conftest import snapshot
from tool_worker import cas as cas_module
from tool_worker.cas import DEFAULT_MAX_BATCH_BYTES, CasClient, ContentError, SpooledBlob
from tool_worker.merkle import Digest

BIG = 48 * 1024 * 1024




def spooled_files(root: str | Path) -> list[Path]:
    return [path for path in Path(root).rglob("*") if path.name.endswith(".part")]


def entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def contents(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([old[0] ^ 1]))


async def test_a_large_file_is_synced_through_disk_not_memory(setup) -> None:
    # The worker gathered a streamed blob's chunks in memory and joined them (twice its size),
    # four streams at once: a workspace holding model weights of a few GB exhausted the host.
    ws, server, manager, _ = setup
    content = os.urandom(BIG)
    (ws / "weights.bin").write_bytes(content)
    (ws / "run.sh").write_bytes(content)  # the same blob at a second path, executable
    os.chmod(ws / "run.sh", 0o755)
    (ws / "small.txt").write_text("small\n")
    ref = await snapshot(server, ws)
    tracemalloc.start()
    try:
        placement = await manager.place(ref)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        tree = Path(placement.path)
        assert (tree / "weights.bin").read_bytes() == content
        assert (tree / "run.sh").read_bytes() == content
        assert (tree / "small.txt").read_text() == "small\n"
        assert os.stat(tree / "run.sh").st_mode & stat.S_IXUSR
        assert not os.stat(tree / "weights.bin").st_mode & stat.S_IXUSR
        for name in ("weights.bin", "run.sh"):
            assert os.stat(tree / name).st_mtime_ns == os.stat(ws / name).st_mtime_ns
    finally:
        placement.release()
    assert peak < BIG // 2, f"the sync held {peak:,} bytes at its peak for a {BIG:,}-byte blob"
    assert not spooled_files(manager.slot)
    assert manager.holdings[str(ws)].mode == "synced"


async def test_a_large_blob_taken_back_from_the_store_is_checked_and_refetched_when_corrupt(setup) -> None:
    ws, server, manager, _ = setup
    content = os.urandom(2 * DEFAULT_MAX_BATCH_BYTES)
    digest = Digest(hashlib.sha256(content).hexdigest(), len(content))
    (ws / "big.bin").write_bytes(content)
    (await manager.place(await snapshot(server, ws))).release()
    os.rename(ws / "big.bin", ws / "away.bin")
    (ws / "away.bin").unlink()
    (await manager.place(await snapshot(server, ws))).release()
    assert digest.hash in manager.store  # the tree gave its old version to the store
    flip_byte(manager.store.path(digest.hash), len(content) // 2)
    (ws / "big.bin").write_bytes(content)
    placement = await manager.place(await snapshot(server, ws))
    try:
        assert (Path(placement.path) / "big.bin").read_bytes() == content
    finally:
        placement.release()
    assert manager.store.corrupt_discarded == 1
    assert not spooled_files(manager.slot)


class _ByteStream(bytestream_pb2_grpc.ByteStreamServicer):
    """Streams `data` (corrupted when asked), or one chunk and then nothing until `release` is set;
    records whether the call carried a deadline."""

    def __init__(self, data: bytes, *, corrupt: bool = False, stall: bool = False) -> None:
        self.original = data
        self.data = bytearray(data)
        if corrupt:
            self.data[-1] ^= 1
        self.stall = stall
        self.release = asyncio.Event()
        self.deadlines: list[float | None] = []

    async def Read(self, request, context):
        self.deadlines.append(context.time_remaining())
        for start in range(0, len(self.data), STREAM_CHUNK):
            yield bytestream_pb2.ReadResponse(data=bytes(self.data[start:start + STREAM_CHUNK]))
            if self.stall:
                await self.release.wait()


@contextlib.asynccontextmanager
async def serving(servicer: bytestream_pb2_grpc.ByteStreamServicer):
    """A gRPC server with only `servicer`'s ByteStream; yields its address."""
    server = grpc.aio.server()
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if isinstance(servicer, _ByteStream):
            servicer.release.set()
        await server.stop(0)


async def fetch_spooled(servicer: _ByteStream, spool_dir: Path) -> tuple[CasClient, list | ContentError]:
    """Fetches the servicer's blob through ByteStream, spooled to `spool_dir`: what arrived, or the
    ContentError the fetch ended with."""
    digest = Digest(hashlib.sha256(servicer.original).hexdigest(), len(servicer.original))
    counter = iter(range(1_000))
    got: list = []
    async with serving(servicer) as address, grpc.aio.insecure_channel(address) as channel:
        client = CasClient(channel, max_batch_bytes=1024)
        try:
            async for batch in client.fetch(
                [digest], spool=lambda d: str(spool_dir / f"{d.hash}.{next(counter)}.part")
            ):
                got.extend(batch)
        except ContentError as exc:
            return client, exc
    return client, got


async def test_a_spooled_stream_has_no_deadline_as_a_whole_and_arrives_as_a_checked_file(tmp_path: Path) -> None:
    content = os.urandom(3 * STREAM_CHUNK + 17)
    servicer = _ByteStream(content)
    _, got = await fetch_spooled(servicer, tmp_path)
    assert isinstance(got, list)
    [(arrived, blob)] = got
    assert arrived.hash == hashlib.sha256(content).hexdigest() and isinstance(blob, SpooledBlob)
    assert contents(blob.path) == content
    # A 120 s deadline for the whole stream failed every sync of a file larger than a slow link
    # carries in that time; the limit is now per message.
    assert servicer.deadlines == [None]


async def test_a_corrupt_spooled_stream_is_fetched_again_then_fails_leaving_no_file(tmp_path: Path) -> None:
    client, got = await fetch_spooled(_ByteStream(os.urandom(2 * STREAM_CHUNK), corrupt=True), tmp_path)
    assert isinstance(got, ContentError) and "corrupt 2 times" in str(got)
    assert client.corrupt_received == 2
    assert entries(tmp_path) == []


async def test_a_stream_that_stops_sending_fails_after_the_message_timeout_leaving_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cas_module, "REQUEST_TIMEOUT", 0.2)
    _, got = await fetch_spooled(_ByteStream(os.urandom(2 * STREAM_CHUNK), stall=True), tmp_path)
    assert isinstance(got, ContentError)
    assert re.search(f"sent nothing of blob .* {STREAM_CHUNK:,} bytes in", str(got)), got
    assert entries(tmp_path) == []


class _UploadSink(bytestream_pb2_grpc.ByteStreamServicer):
    """Takes uploads, hashing what arrives; a blob counts as committed only on finish_write."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.deadlines: list[float | None] = []

    async def Write(self, request_iterator, context):
        self.deadlines.append(context.time_remaining())
        hasher = hashlib.sha256()
        async for request in request_iterator:
            hasher.update(request.data)
            if request.finish_write:
                self.committed.append(hasher.hexdigest())
                return bytestream_pb2.WriteResponse()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended without finish_write")


async def test_a_large_file_is_uploaded_to_an_external_cas_from_disk_and_never_committed_once_changed(
    tmp_path: Path,
) -> None:
    # The upload read a whole file into memory, then sent it under a 120 s deadline for the lot.
    content = os.urandom(BIG)
    digest = Digest(hashlib.sha256(content).hexdigest(), len(content))
    (tmp_path / "weights.bin").write_bytes(content)
    sink = _UploadSink()
    async with serving(sink) as address:
        external = ExternalCas(address)
        await external.connect()
        try:
            tracemalloc.start()
            try:
                await external._write(digest, None, str(tmp_path), "weights.bin")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert sink.committed == [digest.hash]
            assert peak < BIG // 2, f"the upload held {peak:,} bytes at its peak for a {BIG:,}-byte file"
            assert sink.deadlines[0] is not None and sink.deadlines[0] > 120  # 120 s and a second per MiB

            (tmp_path / "weights.bin").write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # changed since
            with pytest.raises(ExternalCasError, match=r"weights\.bin changed while its snapshot was being uploaded"):
                await external._write(digest, None, str(tmp_path), "weights.bin")
            assert sink.committed == [digest.hash]  # the changed bytes were never committed under the digest
        finally:
            await external.close()
