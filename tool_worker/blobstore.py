"""The worker's blob store: file contents by digest on disk, least recently used first out, checked
against their digest every time they are taken out.

Files a materialized tree stops holding move in here (a rename, no copy), so going back to an
earlier snapshot, or to another workspace with the same files, fetches nothing. A blob whose
bytes no longer match its digest (a bad disk, a meddling process) is deleted and reported as
missing: it is fetched again, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from functools import wraps
from typing import Any, TypeVar

from tool_worker.merkle import EMPTY_DIGEST, Digest, disk_bytes

log = logging.getLogger("codelane.worker")

# A blob's file name: its lowercase hex SHA-256. Anything else in a shard is what `put` left
# half-written under its temporary name when the worker was killed.
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 1024 * 1024


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @wraps(method)
    def holding(self: BlobStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return holding  # type: ignore[return-value]


class BlobStore:
    """One lock around each method: the syncs of two workspaces run in threads of their own and
    share the store (an eviction iterating the blobs while another thread moved one in, or two
    `bytes` updates at once, broke its count)."""

    def __init__(self, directory: str) -> None:
        self._lock = threading.RLock()  # re-entered: take_in evicts
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        # The disk the blobs are counted to take (whole blocks: merkle.disk_bytes).
        self.bytes = 0
        self.corrupt_discarded = 0
        entries = []
        for shard in os.scandir(directory):
            if not shard.is_dir():
                continue
            for blob in os.scandir(shard.path):
                if not _BLOB_NAME.fullmatch(blob.name):
                    # The slot is this worker's alone (see WorkspaceManager.slot): nobody writes it.
                    with contextlib.suppress(OSError):
                        os.unlink(blob.path)
                    continue
                info = blob.stat()
                entries.append((info.st_mtime_ns, blob.name, info.st_size))
        for _, name, size in sorted(entries):
            self._sizes[name] = size
            self.bytes += disk_bytes(size)

    def path(self, hash_hex: str) -> str:
        return os.path.join(self.directory, hash_hex[:2], hash_hex)

    @_locked
    def __contains__(self, hash_hex: str) -> bool:
        return hash_hex in self._sizes

    @_locked
    def take_in(self, source: str, digest: Digest, budget: int | None = None,
                keep: Container[str] = frozenset()) -> None:
        """Moves a file whose content is `digest` into the store (the file is gone after). With a
        `budget`, least recently used blobs (not those in `keep`) make room for it first; a file
        they cannot make room for is deleted instead."""
        if digest.hash in self._sizes or digest.size == 0:
            os.unlink(source)
            return
        if budget is not None:
            self.evict(budget - disk_bytes(digest.size), keep, strict=False)
            if self.bytes + disk_bytes(digest.size) > budget:
                os.unlink(source)
                return
        target = self.path(digest.hash)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        self._sizes[digest.hash] = digest.size
        # An old version a tree gave up: the first to go, and never behind the blobs `prefer`
        # put last (`evict` stops at the first of those).
        self._sizes.move_to_end(digest.hash, last=False)
        self.bytes += disk_bytes(digest.size)

    @_locked
    def put(self, digest: Digest, data: bytes) -> None:
        if digest.hash in self._sizes or digest.size == 0:
            return
        target = self.path(digest.hash)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
        self._sizes[digest.hash] = digest.size
        self.bytes += disk_bytes(digest.size)

    def spool_path(self, digest: Digest) -> str:
        """A new file name beside where the blob would be kept, for a large blob on its way in or
        out (`cas.SpooledBlob`): the same filesystem as the trees, so it moves into a tree by a
        rename. Left behind by a killed worker, it goes when the store is next opened."""
        target = self.path(digest.hash)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return f"{target}.{os.urandom(6).hex()}.part"

    def copy_out(self, digest: Digest, destination: str) -> bool:
        """Copies a blob to `destination`, checked as it is copied (a piece at a time, so a large
        blob never sits in memory). False when it is missing or corrupt (then deleted, and the
        partial copy with it)."""
        try:
            source = open(self.path(digest.hash), "rb")
        except OSError:
            with self._lock:
                self._forget(digest.hash)
            return False
        hasher = hashlib.sha256()
        copied = 0
        try:
            with source, open(destination, "wb") as target:
                while chunk := source.read(_COPY_CHUNK):
                    hasher.update(chunk)
                    target.write(chunk)
                    copied += len(chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(destination)
            raise
        return self._checked(digest, copied == digest.size and hasher.hexdigest() == digest.hash, destination)

    def _checked(self, digest: Digest, intact: bool, partial: str | None = None) -> bool:
        with self._lock:
            if not intact:
                log.warning("blob %s in the cache is corrupt (its bytes do not match its digest): discarded, "
                            "it will be fetched again", digest)
                self.corrupt_discarded += 1
                self._drop(digest.hash)
                if partial is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(partial)
                return False
            if digest.hash in self._sizes:
                self._sizes.move_to_end(digest.hash)
        return True

    def read(self, digest: Digest) -> bytes | None:
        """The blob's bytes, verified; None when it is missing or corrupt (then deleted). Read
        and hashed outside the lock: another thread dropping it meanwhile makes it missing."""
        if digest == EMPTY_DIGEST:
            return b""
        if digest.hash not in self:
            return None
        try:
            with open(self.path(digest.hash), "rb") as handle:
                data = handle.read()
        except OSError:
            with self._lock:
                self._forget(digest.hash)
            return None
        intact = len(data) == digest.size and hashlib.sha256(data).hexdigest() == digest.hash
        return data if self._checked(digest, intact) else None

    @_locked
    def prefer(self, hashes: Iterable[str]) -> None:
        """The blobs a sync is about to copy out become the most recently used, in one pass: an
        eviction that must keep them then meets them last, instead of walking past them at every
        blob the sync moves in (thousands of each made a sync quadratic)."""
        for hash_hex in hashes:
            if hash_hex in self._sizes:
                self._sizes.move_to_end(hash_hex)

    @_locked
    def evict(self, budget: int, keep: Container[str] = frozenset(), *, strict: bool = True) -> None:
        """Drops least recently used blobs until the store holds at most `budget` bytes: those in
        `keep` (about to be used) last, and only if `strict`. Not `strict`, it stops at the first
        blob of `keep` (`prefer` put them last: what follows is theirs)."""
        if self.bytes <= budget:
            return
        doomed, freed = [], 0
        for hash_hex, size in self._sizes.items():
            if self.bytes - freed <= budget:
                break
            if hash_hex in keep:
                if not strict:
                    break
                continue
            doomed.append(hash_hex)
            freed += disk_bytes(size)
        for hash_hex in doomed:
            self._drop(hash_hex)
        while strict and self._sizes and self.bytes > budget:
            self._drop(next(iter(self._sizes)))

    def _drop(self, hash_hex: str) -> None:
        try:
            os.unlink(self.path(hash_hex))
        except FileNotFoundError:
            pass
        self._forget(hash_hex)

    def _forget(self, hash_hex: str) -> None:
        size = self._sizes.pop(hash_hex, None)
        if size is not None:
            self.bytes -= disk_bytes(size)

    @_locked
    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)
        self._sizes.clear()
        self.bytes = 0
