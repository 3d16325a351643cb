"""`codelane server --cas ADDR`: snapshots are uploaded to an external REAPI v2 CAS (BuildGrid,
bb-storage, NativeLink), and workers fetch them from there (Welcome.content names it).

Each new snapshot is published before any call names it: FindMissingBlobs over its directory
blobs and the files changed since the last upload, then BatchUpdateBlobs for small blobs and
ByteStream.Write for large ones. Digests known to be uploaded are remembered, so an unchanged
file is never asked about twice (a CAS that evicted it answers NOT_FOUND to the worker, whose
call then ends with an error saying so).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator

import grpc

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2, remote_execution_pb2_grpc
from codelane.transport import CHANNEL_OPTIONS
from session_server.content import MAX_BATCH_BYTES, STREAM_CHUNK
from session_server.snapshots import Snapshot
from tool_worker.merkle import Digest

# How many digests are remembered as uploaded.
MAX_KNOWN = 1_000_000
REQUEST_TIMEOUT = 120.0
# A streamed upload may take a second more per MiB than REQUEST_TIMEOUT: its deadline assumes a
# link at least this fast.
MIN_UPLOAD_BYTES_PER_SECOND = 1024 * 1024


class ExternalCasError(OSError):
    """The external CAS refused or failed an upload; the message says which and why."""


def _address(target: str) -> str:
    for scheme in ("grpc://", "grpcs://"):
        if target.startswith(scheme):
            return target[len(scheme):]
    return target


class ExternalCas:
    def __init__(self, address: str, instance_name: str = "") -> None:
        self.address = address
        self.instance_name = instance_name
        self._channel: grpc.aio.Channel | None = None
        self._known: set[str] = set()
        self.uploaded_blobs = 0

    async def connect(self) -> None:
        target = _address(self.address)
        if self.address.startswith("grpcs://"):
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def publish(self, snapshot: Snapshot) -> None:
        """Uploads what the CAS lacks of `snapshot`. Raises ExternalCasError."""
        assert self._channel is not None, "connect() first"
        cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(self._channel)
        blobs = {h: b for h, b in snapshot.tree.blobs.items() if h not in self._known and b}
        files = {h: p for h, p in snapshot.tree.files.items() if h not in self._known}
        sizes: dict[str, int] = {h: len(b) for h, b in blobs.items()}
        for hash_hex, relative in files.items():
            sizes[hash_hex] = await asyncio.to_thread(_size, snapshot.workspace, relative)
        candidates = [Digest(h, s) for h, s in sizes.items() if s > 0]
        missing: list[Digest] = []
        try:
            for start in range(0, len(candidates), 10_000):
                response = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
                    instance_name=self.instance_name,
                    blob_digests=[remote_execution_pb2.Digest(hash=d.hash, size_bytes=d.size)
                                  for d in candidates[start : start + 10_000]],
                ), timeout=REQUEST_TIMEOUT)
                missing += [Digest(d.hash, d.size_bytes) for d in response.missing_blob_digests]
            batch: list[tuple[Digest, bytes]] = []
            total = 0
            for digest in missing:
                if digest.size > MAX_BATCH_BYTES:
                    await self._write(digest, blobs.get(digest.hash), snapshot.workspace, files.get(digest.hash))
                    continue
                data = blobs.get(digest.hash)
                if data is None:
                    data = await asyncio.to_thread(_read, snapshot.workspace, files[digest.hash], digest)
                if total + digest.size > MAX_BATCH_BYTES:
                    await self._batch(cas, batch)
                    batch, total = [], 0
                batch.append((digest, data))
                total += digest.size
            await self._batch(cas, batch)
        except grpc.aio.AioRpcError as exc:
            raise ExternalCasError(f"uploading to the CAS at {self.address} failed ({exc.code().name}: "
                                   f"{exc.details()})") from None
        if len(self._known) > MAX_KNOWN:
            self._known.clear()
        self._known.update(sizes)

    async def _batch(self, cas, batch: list[tuple[Digest, bytes]]) -> None:
        if not batch:
            return
        response = await cas.BatchUpdateBlobs(remote_execution_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance_name,
            requests=[remote_execution_pb2.BatchUpdateBlobsRequest.Request(
                digest=remote_execution_pb2.Digest(hash=d.hash, size_bytes=d.size), data=data) for d, data in batch],
        ), timeout=REQUEST_TIMEOUT)
        for entry in response.responses:
            if entry.status.code != 0:
                raise ExternalCasError(f"the CAS at {self.address} refused blob {entry.digest.hash}: "
                                       f"{entry.status.message}")
        self.uploaded_blobs += len(batch)

    async def _write(self, digest: Digest, data: bytes | None, workspace: str, relative: str | None) -> None:
        """Streams a large blob: a directory blob from memory, a file from disk a chunk at a time
        (a model's weights are never read whole into memory). The file is hashed as it is read and
        the last chunk (the one that finishes the write) is held back until the hash matches: a
        file that changed since its snapshot is never committed under the snapshot's digest."""
        assert self._channel is not None
        stub = bytestream_pb2_grpc.ByteStreamStub(self._channel)
        name = f"{self.instance_name}/uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}".lstrip("/")

        pieces = _memory_chunks(data) if data is not None else _file_chunks(workspace, relative or "", digest)
        # The whole upload's deadline grows with its size: 120 s, and a second per MiB.
        call = stub.Write(timeout=REQUEST_TIMEOUT + digest.size / MIN_UPLOAD_BYTES_PER_SECOND)
        try:
            offset = 0
            async for piece, last in pieces:
                await call.write(bytestream_pb2.WriteRequest(resource_name=name, write_offset=offset, data=piece,
                                                             finish_write=last))
                offset += len(piece)
            await call.done_writing()
            await call
        except BaseException:
            call.cancel()
            raise
        self.uploaded_blobs += 1


async def _memory_chunks(data: bytes) -> AsyncIterator[tuple[bytes, bool]]:
    for offset in range(0, len(data), STREAM_CHUNK):
        yield data[offset : offset + STREAM_CHUNK], offset + STREAM_CHUNK >= len(data)


async def _file_chunks(workspace: str, relative: str, digest: Digest) -> AsyncIterator[tuple[bytes, bool]]:
    path = os.path.join(workspace, relative)
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        hasher = hashlib.sha256()
        held: bytes | None = None
        size = 0
        while chunk := await asyncio.to_thread(handle.read, STREAM_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if held is not None:
                yield held, False
            held = chunk
        if held is None or size != digest.size or hasher.hexdigest() != digest.hash:
            raise ExternalCasError(f"{relative} changed while its snapshot was being uploaded")
        yield held, True
    finally:
        handle.close()


def _size(workspace: str, relative: str) -> int:
    try:
        return os.stat(os.path.join(workspace, relative)).st_size
    except OSError:
        return 0


def _read(workspace: str, relative: str, digest: Digest) -> bytes:
    path = os.path.join(workspace, relative)
    with open(path, "rb") as handle:
        data = handle.read()
    if Digest.of(data) != digest:
        raise ExternalCasError(f"{relative} changed while its snapshot was being uploaded")
    return data

