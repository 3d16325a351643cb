"""Fetching blobs from a REAPI v2 CAS (the hub's own, or an external one named in Welcome).

Small blobs travel in BatchReadBlobs requests of at most `max_batch_bytes`, large ones through
ByteStream.Read; several requests are in flight at once. Every blob is checked against its digest
on arrival: a mismatch is fetched once more, then fails the sync (`ContentError`), so wrong bytes
are never used.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2, remote_execution_pb2_grpc
from tool_worker.merkle import EMPTY_DIGEST, Digest

log = logging.getLogger("codelane.worker")

# Blob bytes per batch: under the 4 MiB message limit that many gRPC servers keep by default.
DEFAULT_MAX_BATCH_BYTES = 3 * 1024 * 1024
MAX_BATCH_DIGESTS = 1000
# Requests in flight at once: enough to keep a link busy while the previous answers are written.
PARALLEL_REQUESTS = 4
FETCH_ATTEMPTS = 2
# No blob fetch waits longer than this for an answer.
REQUEST_TIMEOUT = 120.0


class ContentError(Exception):
    """A blob could not be fetched intact; the message says which and why."""


class BlobMissing(ContentError):
    """The CAS does not hold a blob (NOT_FOUND): the workspace changed since the snapshot that
    named it was taken, so a newer snapshot is needed."""


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

    async def fetch(self, digests: Sequence[Digest]) -> AsyncIterator[list[tuple[Digest, bytes]]]:
        """Yields the blobs in batches as they arrive, each checked. Raises ContentError."""
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
        jobs += [functools.partial(self._stream, digest) for digest in large]
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
                await results.put(answer)

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

    async def read(self, digests: Sequence[Digest]) -> dict[str, bytes]:
        """The blobs by hash (small ones: directory trees)."""
        out: dict[str, bytes] = {d.hash: b"" for d in digests if d == EMPTY_DIGEST}
        async for batch in self.fetch(digests):
            out.update((digest.hash, data) for digest, data in batch)
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

    async def _stream(self, digest: Digest) -> list[tuple[Digest, bytes]]:
        name = f"{self.instance_name}/blobs/{digest.hash}/{digest.size}".lstrip("/")
        for attempt in range(FETCH_ATTEMPTS):
            chunks = []
            received = 0
            try:
                call = self._bytestream.Read(bytestream_pb2.ReadRequest(resource_name=name),
                                             metadata=self._metadata, timeout=REQUEST_TIMEOUT)
                async for response in call:
                    received += len(response.data)
                    if received > digest.size:
                        # Kept, the chunks of a stream without end would grow without bound.
                        call.cancel()
                        raise ContentError(f"the CAS streamed more than the {digest.size} bytes of blob {digest}")
                    chunks.append(response.data)
            except grpc.aio.AioRpcError as exc:
                error = BlobMissing if exc.code() is grpc.StatusCode.NOT_FOUND else ContentError
                raise error(f"the CAS cannot stream blob {digest} ({exc.code().name}: {exc.details()})") from None
            data = b"".join(chunks)
            if await asyncio.to_thread(_ok, digest, data):
                return [(digest, data)]
            self.corrupt_received += 1
            log.warning("blob %s arrived corrupt (attempt %d): fetching it again", digest, attempt + 1)
        raise ContentError(f"blob {digest} arrived corrupt {FETCH_ATTEMPTS} times")
