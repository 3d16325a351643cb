"""Fetching blobs from a REAPI v2 CAS (the hub's own, or an external one named in Welcome).

Small blobs travel in BatchReadBlobs requests of at most `max_batch_bytes`, large ones through
ByteStream.Read; several requests are in flight at once. Every blob is checked against its digest
on arrival: a mismatch is fetched once more, then fails the sync (`ContentError`), so wrong bytes
are never used. A large blob can be spooled to a file as it streams (hashed on the way), so that
a multi-gigabyte file (a model's weights) costs disk, not memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2, remote_execution_pb2_grpc
from tool_worker.fds import write_all
from tool_worker.merkle import EMPTY_DIGEST, Digest

log = logging.getLogger("codelane.worker")

# Blob bytes per batch: under the 4 MiB message limit that many gRPC servers keep by default.
DEFAULT_MAX_BATCH_BYTES = 3 * 1024 * 1024
MAX_BATCH_DIGESTS = 1000
# Requests in flight at once: enough to keep a link busy while the previous answers are written.
PARALLEL_REQUESTS = 4
FETCH_ATTEMPTS = 2
# No blob fetch waits longer than this for an answer, nor a stream this long for its next message
# (a stream as a whole may take longer: a large blob over a slow link).
REQUEST_TIMEOUT = 120.0
# A spooled stream is written out in pieces of about this size, each in a thread.
SPOOL_WRITE_BYTES = 4 * 1024 * 1024


class ContentError(Exception):
    """A blob could not be fetched intact; the message says which and why."""


class BlobMissing(ContentError):
    """The CAS does not hold a blob (NOT_FOUND): the workspace changed since the snapshot that
    named it was taken, so a newer snapshot is needed."""


@dataclass(frozen=True)
class SpooledBlob:
    """A blob's checked bytes in a file, not in memory. The file is the receiver's once yielded:
    it moves it into place or deletes it."""

    path: str


Blob = bytes | SpooledBlob
# Where a large blob is spooled: a file name the caller owns, for a digest.
Spool = Callable[[Digest], str]


def discard(blob: Blob) -> None:
    if isinstance(blob, SpooledBlob):
        with contextlib.suppress(OSError):
            os.unlink(blob.path)


def _ok(digest: Digest, data: bytes) -> bool:
    return len(data) == digest.size and hashlib.sha256(data).hexdigest() == digest.hash


def _check(wanted: dict[str, Digest], responses) -> list[tuple[Digest, bytes | None]]:
    """Each wanted blob of a response with its bytes, or None when they do not match its digest."""
    out = []
    for entry in responses:
        digest = wanted.get(entry.digest.hash)
        if digest is not None:
            out.append((digest, entry.data if _ok(digest, entry.data) else None))
    return out


class CasClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        instance_name: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self._cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self.instance_name = instance_name
        self._metadata = tuple(metadata)
        self.max_batch_bytes = min(max_batch_bytes or DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_BYTES)
        self.corrupt_received = 0

    async def fetch(self, digests: Sequence[Digest], spool: Spool | None = None
                    ) -> AsyncIterator[list[tuple[Digest, Blob]]]:
        """Yields the blobs in batches as they arrive, each checked. Raises ContentError. With a
        `spool`, blobs too large for a batch arrive as SpooledBlob files; without, as bytes."""
        # The empty blob is known without asking; another digest of size 0 is asked for like any
        # other, and the CAS answers NOT_FOUND: taken as empty, it was bytes that do not match it.
        unique = list({d.hash: d for d in digests if d != EMPTY_DIGEST}.values())
        small = sorted((d for d in unique if d.size <= self.max_batch_bytes), key=lambda d: d.size)
        large = [d for d in unique if d.size > self.max_batch_bytes]
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        total = 0
        for digest in small:
            if current and (total + digest.size > self.max_batch_bytes or len(current) >= MAX_BATCH_DIGESTS):
                batches.append(current)
                current, total = [], 0
            current.append(digest)
            total += digest.size
        if current:
            batches.append(current)
        jobs = [functools.partial(self._batch, batch) for batch in batches]
        jobs += [functools.partial(self._stream, digest, spool) for digest in large]
        # Bounded: a request keeps its slot until its answer is taken, so a slow consumer (the
        # writer of a cold sync) holds a few batches in memory, not the whole snapshot.
        results: asyncio.Queue = asyncio.Queue(maxsize=PARALLEL_REQUESTS)
        limit = asyncio.Semaphore(PARALLEL_REQUESTS)

        async def run(job) -> None:
            async with limit:
                try:
                    answer = await job()
                except Exception as exc:
                    await results.put(exc)
                    raise
                # Cancelled here (the consumer is gone) it only stops waiting: nothing takes it.
                try:
                    await results.put(answer)
                except asyncio.CancelledError:
                    _discard_all(answer)
                    raise

        tasks = [asyncio.create_task(run(job)) for job in jobs]
        try:
            for _ in tasks:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item if isinstance(item, ContentError) else ContentError(str(item)) from item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Answers that arrived but were never yielded: their spooled files are nobody's.
            while not results.empty():
                item = results.get_nowait()
                if not isinstance(item, BaseException):
                    _discard_all(item)

    async def read(self, digests: Sequence[Digest]) -> dict[str, bytes]:
        """The blobs by hash, in memory (directory trees)."""
        out: dict[str, bytes] = {d.hash: b"" for d in digests if d == EMPTY_DIGEST}
        async for batch in self.fetch(digests):
            out.update((digest.hash, data) for digest, data in batch if isinstance(data, bytes))
        return out

    async def _batch(self, digests: list[Digest]) -> list[tuple[Digest, bytes]]:
        wanted = {d.hash: d for d in digests}
        got: list[tuple[Digest, bytes]] = []
        for attempt in range(FETCH_ATTEMPTS):
            request = remote_execution_pb2.BatchReadBlobsRequest(
                instance_name=self.instance_name,
                digests=[remote_execution_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in wanted.values()],
            )
            try:
                response = await self._cas.BatchReadBlobs(request, metadata=self._metadata, timeout=REQUEST_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                raise ContentError(f"the CAS refused to send blobs ({exc.code().name}: {exc.details()})") from None
            for entry in response.responses:
                if entry.digest.hash in wanted and entry.status.code != 0:
                    why = entry.status.message or f"status {entry.status.code}"
                    error = BlobMissing if entry.status.code == grpc.StatusCode.NOT_FOUND.value[0] else ContentError
                    raise error(f"the CAS cannot send blob {wanted[entry.digest.hash]}: {why}")
            # On the loop: a batch is at most 3 MiB, about 2 ms of SHA-256. In a thread it cost a hop
            # per batch, and one more thread taking the GIL back from the sync's writer at every
            # blob (each context switch dearer than the hashing it let run beside).
            checked = _check(wanted, response.responses)
            for digest, data in checked:
                if data is None:
                    self.corrupt_received += 1
                    log.warning("blob %s arrived corrupt (attempt %d): fetching it again", digest, attempt + 1)
                else:
                    got.append((digest, data))
                    del wanted[digest.hash]
            if not wanted:
                return got
        raise ContentError(f"blobs arrived corrupt {FETCH_ATTEMPTS} times: {', '.join(map(str, wanted.values()))}")

    async def _stream(self, digest: Digest, spool: Spool | None) -> list[tuple[Digest, Blob]]:
        name = f"{self.instance_name}/blobs/{digest.hash}/{digest.size}".lstrip("/")
        for attempt in range(FETCH_ATTEMPTS):
            sink = _FileSink(spool(digest)) if spool is not None else _MemorySink()
            try:
                # No deadline for the whole stream (a large blob over a slow link may need more than
                # any one figure); each message must come within REQUEST_TIMEOUT instead.
                call = self._bytestream.Read(bytestream_pb2.ReadRequest(resource_name=name), metadata=self._metadata)
                try:
                    while True:
                        try:
                            response = await asyncio.wait_for(call.read(), REQUEST_TIMEOUT)
                        except TimeoutError:
                            raise ContentError(f"the CAS sent nothing of blob {digest} for {REQUEST_TIMEOUT:.0f} s, "
                                               f"{sink.received:,} bytes in") from None
                        if response is grpc.aio.EOF:
                            break
                        if sink.received + len(response.data) > digest.size:
                            # Kept, the bytes of a stream without end would grow without bound.
                            raise ContentError(f"the CAS streamed more than the {digest.size} bytes of blob {digest}")
                        await sink.add(response.data)
                finally:
                    call.cancel()
                intact = await sink.finish(digest)
            except grpc.aio.AioRpcError as exc:
                sink.abandon()
                error = BlobMissing if exc.code() is grpc.StatusCode.NOT_FOUND else ContentError
                raise error(f"the CAS cannot stream blob {digest} ({exc.code().name}: {exc.details()})") from None
            except BaseException:
                sink.abandon()
                raise
            if intact is not None:
                return [(digest, intact)]
            self.corrupt_received += 1
            log.warning("blob %s arrived corrupt (attempt %d): fetching it again", digest, attempt + 1)
        raise ContentError(f"blob {digest} arrived corrupt {FETCH_ATTEMPTS} times")


def _discard_all(answer: list[tuple[Digest, Blob]]) -> None:
    for _, blob in answer:
        discard(blob)


class _MemorySink:
    def __init__(self) -> None:
        self.received = 0
        self._chunks: list[bytes] = []

    async def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self.received += len(data)

    async def finish(self, digest: Digest) -> bytes | None:
        data = b"".join(self._chunks)
        return data if await asyncio.to_thread(_ok, digest, data) else None

    def abandon(self) -> None:
        self._chunks.clear()


class _FileSink:
    """Writes a stream to a new file and hashes it on the way, a few MiB at a time in a thread (one
    write at a time, in order, while the next messages arrive)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received = 0
        self._hasher = hashlib.sha256()
        # Created with the default file mode (0o666 less the umask), as the tree's other files.
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing: asyncio.Future[None] | None = None

    async def add(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.received += len(data)
        if self._pending_bytes >= SPOOL_WRITE_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._writing is not None:
            # Shielded: a cancelled fetch must not leave a thread writing into a descriptor that
            # `abandon` closes (and the process may give to another file).
            await asyncio.shield(self._writing)
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, chunks))

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)
            write_all(self._descriptor, chunk)

    async def finish(self, digest: Digest) -> SpooledBlob | None:
        await self._flush()
        assert self._writing is not None
        await asyncio.shield(self._writing)
        os.close(self._descriptor)
        self._descriptor = -1
        if self.received == digest.size and self._hasher.hexdigest() == digest.hash:
            return SpooledBlob(self.path)
        self.abandon()
        return None

    def abandon(self) -> None:
        # A write still running in its thread is let finish before its descriptor closes; the
        # unlink removes the name at once, and the space goes with the descriptor.
        writing = self._writing
        if writing is None:
            self._close()
        elif writing.done():
            self._closed_after(writing)
        else:
            writing.add_done_callback(self._closed_after)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _closed_after(self, writing: asyncio.Future[None]) -> None:
        # Its failure (a full disk) is already told by the error that abandoned the stream.
        if not writing.cancelled():
            writing.exception()
        self._close()

    def _close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
