"""The server's content-addressable storage: snapshot blobs, served to workers by digest.

Directory blobs come from memory (the snapshots); file blobs are read from the workspace file a
snapshot named for that content, and hashed while they are read. A file that changed since is
`BlobNotFound`: a worker gets NOT_FOUND, never wrong bytes. Blobs uploaded by clients
(BatchUpdateBlobs, ByteStream.Write) are checked against their digest and kept in a bounded
memory store; the server never asks for them itself.

Domain logic: no grpc (`session_server.api.content` serves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

from session_server.snapshots import SnapshotRegistry
from tool_worker.merkle import EMPTY_DIGEST, Digest, open_as_named

if TYPE_CHECKING:
    from codelane.reapi.remote_execution_pb2 import Directory

# Largest total of blob bytes in one BatchReadBlobs or BatchUpdateBlobs; bigger blobs go through
# ByteStream. Under the 4 MiB message limit most gRPC clients keep by default, envelope included.
MAX_BATCH_BYTES = 3 * 1024 * 1024
MAX_BATCH_DIGESTS = 10_000
# Chunk of a ByteStream read or write.
STREAM_CHUNK = 1024 * 1024
# Batches (or stream chunks) read at once. Reads from the page cache are CPU work under the GIL:
# several threads only hand it to each other at every open, read and hash (a context switch per
# file; a cold sync of 10,000 files was 5-10% slower with 8 than with 1 or 2). Two still overlap
# a read that waits for the disk with one that does not. The limit is the server's: workers
# syncing at once share it (measured with one worker and files in the page cache).
MAX_CONCURRENT_READS = 2
# Uploaded blobs kept in memory.
MAX_UPLOADED_BYTES = 256 * 1024 * 1024


class BlobNotFound(Exception):
    """The storage does not hold the blob (or its file changed since the snapshot)."""


class InvalidBlob(ValueError):
    """A request names a blob badly, or sends bytes that do not match its digest."""


class UploadsFull(Exception):
    """Uploads in progress already hold what the server keeps of uploads."""


class ContentStore:
    def __init__(self, registry: SnapshotRegistry, *, max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self._registry = registry
        self.max_batch_bytes = max_batch_bytes
        self._reads = asyncio.Semaphore(MAX_CONCURRENT_READS)
        self._uploaded: OrderedDict[str, bytes] = OrderedDict()
        self._uploaded_bytes = 0
        # Bytes announced by streamed uploads not finished yet, each held whole until it is.
        self._uploading = 0

    def check_batch(self, digests: Iterable[Digest]) -> None:
        """InvalidBlob when a batch asks for too much at once."""
        digests = list(digests)
        if len(digests) > MAX_BATCH_DIGESTS:
            raise InvalidBlob(f"{len(digests)} digests in one batch: send at most {MAX_BATCH_DIGESTS}")
        total = sum(d.size for d in digests)
        if total > self.max_batch_bytes:
            raise InvalidBlob(
                f"the batch totals {total} bytes, over this server's limit of {self.max_batch_bytes}: split it, "
                "and read blobs larger than the limit with ByteStream.Read"
            )

    def has(self, digest: Digest) -> bool:
        data, paths = self._lookup(digest)
        return data is not None or any(_size_is(path, digest.size) for path in paths)

    @staticmethod
    def check_lookup(count: int) -> None:
        """InvalidBlob for a FindMissingBlobs of more than MAX_BATCH_DIGESTS: each digest is looked
        up in every snapshot and its files stat'ed, on the event loop. Unbounded, one request of
        800,000 digests held every session still for seconds (minutes with many workspaces)."""
        if count > MAX_BATCH_DIGESTS:
            raise InvalidBlob(f"{count:,} digests in one FindMissingBlobs: send at most {MAX_BATCH_DIGESTS:,}")

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in digests if not self.has(d)]

    async def read_many(self, digests: list[Digest]) -> list[bytes | None]:
        """The blobs' bytes, each checked (None: not held), files read in one thread hop: each
        from the newest path that held it, then, for any that no longer does, from the others."""
        found: list[bytes | None] = []
        wanted: list[tuple[int, Digest, list[str]]] = []
        for index, digest in enumerate(digests):
            data, paths = self._lookup(digest, first_path_only=True)
            found.append(data)
            if data is None and paths:
                wanted.append((index, digest, paths))
        retry: list[tuple[int, Digest, list[str]]] = []
        for attempt in (wanted, retry):
            if not attempt:
                continue
            async with self._reads:
                data = await asyncio.to_thread(_read_all, attempt)
            for (index, digest, tried), blob in zip(attempt, data, strict=True):
                found[index] = blob
                if blob is None and attempt is wanted:
                    others = [path for path in self._lookup(digest)[1] if path not in tried]
                    if others:
                        retry.append((index, digest, others))
        return found

    async def read(self, digest: Digest) -> bytes:
        """The blob's bytes, checked against its digest. BlobNotFound otherwise."""
        data = (await self.read_many([digest]))[0]
        if data is None:
            raise BlobNotFound(f"blob {digest} is not held (its file changed since the snapshot that named it)")
        return data

    async def read_stream(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` (at most `limit`, 0 = all), in chunks. The whole file is
        hashed as it is read and the last chunk is held back until the hash matches: a reader
        never gets a complete stream of wrong bytes (BlobNotFound ends it instead)."""
        if offset < 0 or limit < 0 or offset > digest.size:
            raise InvalidBlob(
                f"read_offset {offset} / read_limit {limit} are out of range for a {digest.size}-byte blob"
            )
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        memory, paths = self._lookup(digest)
        if memory is not None:
            for start in range(offset, end, STREAM_CHUNK):
                yield memory[start : min(end, start + STREAM_CHUNK)]
            return
        handle = await asyncio.to_thread(_open_first, paths)
        if handle is None:
            raise BlobNotFound(f"blob {digest} is not held")
        try:
            hasher = hashlib.sha256()
            position = 0
            held: bytes | None = None
            while True:
                async with self._reads:
                    chunk = await asyncio.to_thread(handle.read, STREAM_CHUNK)
                if not chunk:
                    break
                hasher.update(chunk)
                wanted = chunk[max(0, offset - position) : max(0, end - position)]
                position += len(chunk)
                if wanted:
                    if held is not None:
                        yield held
                    held = wanted
            if position != digest.size or hasher.hexdigest() != digest.hash:
                raise BlobNotFound(f"blob {digest} is not held (its file changed since the snapshot that named it)")
            if held is not None:
                yield held
        finally:
            handle.close()

    @contextlib.contextmanager
    def uploading(self, size: int) -> Iterator[None]:
        """Holds `size` bytes of MAX_UPLOADED_BYTES for a streamed upload while it runs: streams
        that never finish would otherwise hold that much each, without bound. UploadsFull when
        the uploads in progress already hold too much."""
        if self._uploading + size > MAX_UPLOADED_BYTES:
            raise UploadsFull(f"uploads in progress hold {self._uploading:,} bytes: with {size:,} more they would "
                              f"pass the {MAX_UPLOADED_BYTES:,} this server keeps; finish them, or try again later")
        self._uploading += size
        try:
            yield
        finally:
            self._uploading -= size

    def store(self, digest: Digest, data: bytes) -> None:
        """Keeps an uploaded blob. InvalidBlob when the bytes do not match the digest."""
        if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
            raise InvalidBlob(f"the data sent for {digest} does not match its digest")
        if digest.hash in self._uploaded or digest.size > MAX_UPLOADED_BYTES:
            return
        self._uploaded[digest.hash] = data
        self._uploaded_bytes += len(data)
        while self._uploaded_bytes > MAX_UPLOADED_BYTES:
            _, dropped = self._uploaded.popitem(last=False)
            self._uploaded_bytes -= len(dropped)

    def walk_tree(self, root: Digest) -> Iterator[Directory]:
        """Every Directory under `root` (itself included), breadth first, each once, parsed as it
        is reached: a caller stops when it has what it wants. Raises BlobNotFound (at the first
        step) when the root is not held, InvalidBlob when a blob of the tree is no Directory."""
        from google.protobuf.message import DecodeError

        from codelane.reapi import remote_execution_pb2  # the one protobuf use: parsing trees

        if self._in_memory(root) is None:
            raise BlobNotFound(f"directory {root} is not held")
        # Blobs are looked up when their turn comes, not when their parent is read: a page then
        # costs its own directories, not their children too.
        seen, queue = {root.hash}, deque([root])
        while queue:
            digest = queue.popleft()
            blob = self._in_memory(digest)
            if blob is None:  # REAPI: the part of the tree that is present
                continue
            try:
                directory = remote_execution_pb2.Directory.FromString(blob)
            except DecodeError:  # an uploaded blob may be any bytes
                raise InvalidBlob(f"blob {digest} in the tree is not a Directory") from None
            yield directory
            for node in directory.directories:
                if node.digest.hash not in seen:
                    seen.add(node.digest.hash)
                    queue.append(Digest(node.digest.hash, node.digest.size_bytes))

    def _in_memory(self, digest: Digest) -> bytes | None:
        return self._lookup(digest)[0]

    def _lookup(self, digest: Digest, *, first_path_only: bool = False) -> tuple[bytes | None, list[str]]:
        """The blob when it is in memory (empty, uploaded, or a snapshot's directory blob), else
        the paths of files that held its content (only the newest: `first_path_only`): one walk
        of the snapshots for both."""
        if digest == EMPTY_DIGEST:
            return b"", []
        data = self._uploaded.get(digest.hash)
        if data is None:
            data, paths = self._registry.find(digest.hash, first_path_only=first_path_only)
        else:
            paths = []
        return (data if data is not None and len(data) == digest.size else None), paths


def _open_first(paths: list[str]):
    for path in paths:
        handle = open_as_named(path)
        if handle is not None:
            return handle
    return None


def _size_is(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def _read_all(wanted: list[tuple[int, Digest, list[str]]]) -> list[bytes | None]:
    return [_read_verified(paths, digest) for _, digest, paths in wanted]


def _read_verified(paths: list[str], digest: Digest) -> bytes | None:
    for path in paths:
        handle = open_as_named(path)
        if handle is None:
            continue
        try:
            with handle:
                data = handle.read(digest.size + 1)
        except OSError:
            continue
        if len(data) == digest.size and hashlib.sha256(data).hexdigest() == digest.hash:
            return data
    return None
