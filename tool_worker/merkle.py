"""The workspace digest (protos/codelane/v1/workspace.proto states it byte by byte): a REAPI v2
Merkle tree of a directory, SHA-256, plus codelane's times tree, computed incrementally.

`TreeScanner` keeps a stat cache (path -> size, mtime_ns, inode, ctime_ns, mode, digest) and a
cache per directory (its children -> its serialized Directory), so rescanning an unchanged tree
hashes no file and serializes no directory. On Linux it also watches every directory it scanned
with inotify, and a rescan only lists and stats the directories that had events: an lstat costs
~5 us on a virtual machine, so a stat-everything rescan of 10,000 files costs 50-100 ms where a
watched one costs well under one. Without inotify (another OS, no watches left, a queue overflow)
every rescan stats every entry. inotify misses writes through mmap and changes made by other
hosts of a network filesystem; `scan(full=True)` stats everything whatever the watches say.
Both the session server (its snapshots) and workers (proving they see the same files) use it.

The Directory messages are encoded here by hand, following the spec's canonical rules: the
protobuf runtime would produce the same bytes (tests check it), at several times the cost.

    python -m tool_worker.merkle DIR [--exclude PATTERN ...]   # prints the digest as JSON
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from tool_worker.inotify import flags as inotify_flags
from tool_worker.inotify import shared_inotify
from tool_worker.tools.globs import atomic_source

DEFAULT_EXCLUDES: tuple[str, ...] = (".git/objects/**", ".codelane/**")
EMPTY_HASH = hashlib.sha256(b"").hexdigest()
# A file changed this recently may change again within the filesystem's timestamp granularity
# without its stat changing ("racy git"): it is hashed again at every scan until it is older.
RACY_NS = 2_000_000_000
# What a worker's --cache-size counts a file as: its bytes rounded up to whole 4 KiB blocks (what
# ext4, xfs and tmpfs give a small file), and a directory as one block. The content bytes alone
# let a tree of many small files take twenty times its bound on disk.
BLOCK_BYTES = 4096


def disk_bytes(size: int) -> int:
    """The disk a file of `size` bytes is counted to take (see BLOCK_BYTES)."""
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES
_READ_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Digest:
    """A REAPI digest: lowercase hex SHA-256 and size in bytes."""

    hash: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """"HASH/SIZE" -> Digest; ValueError for anything else."""
        hash_hex, _, size = text.partition("/")
        if not _HEX64.fullmatch(hash_hex) or not size.isdigit():
            raise ValueError(f"not a digest (HASH/SIZE): {text!r}")
        return cls(hash_hex, int(size))


_HEX64 = re.compile(r"[0-9a-f]{64}")
# The one digest of size 0: any other hash with size 0 names bytes that do not exist.
EMPTY_DIGEST = Digest(EMPTY_HASH, 0)


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """The snapshot a call must see: the workspace's path on the server, its two digests, and
    the workspace's own exclusions (workspace.proto, WorkspaceSnapshot.exclude)."""

    workspace: str
    digest: Digest
    times_digest: Digest
    exclude: tuple[str, ...] = ()


# How a worker holds a workspace (codelane.v1.WorkspaceMode).
SHARED, SYNCED, SYNCING, UNAVAILABLE = "shared", "synced", "syncing", "unavailable"
WORKSPACE_MODES = (SHARED, SYNCED, SYNCING, UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class Holding:
    """What a worker reports holding of a workspace."""

    workspace: str
    mode: str
    digest: Digest | None
    reason: str = ""


def valid_hash(text: str) -> bool:
    return _HEX64.fullmatch(text) is not None


# -- canonical encoding ----------------------------------------------------------------------------


# Every scan encodes each new directory's entries: these run tens of thousands of times on a cold
# tree, so the one-byte varints (lengths under 128, the usual case) and the tags are looked up.
_ONE_BYTE_VARINTS = tuple(bytes((value,)) for value in range(0x80))
# The tag of field 1, 2 and 3 as length-delimited (wire type 2).
_LENGTH_DELIMITED_TAGS = (b"", b"\x0a", b"\x12", b"\x1a")


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _record(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) of field 1, 2 or 3."""
    return _LENGTH_DELIMITED_TAGS[number] + _varint(len(payload)) + payload


def length_delimited_header(number: int, length: int) -> bytes:
    """The tag and length that precede a length-delimited field 1, 2 or 3 of `length` bytes (so a
    large payload can be joined once, not copied into its record first)."""
    return _LENGTH_DELIMITED_TAGS[number] + _varint(length)


def encode_digest(digest: Digest) -> bytes:
    data = _record(1, digest.hash.encode())
    return data + b"\x10" + _varint(digest.size) if digest.size else data


def encode_file_node(name: str, digest: Digest, executable: bool) -> bytes:
    data = _record(1, name.encode()) + _record(2, encode_digest(digest))
    return data + b"\x20\x01" if executable else data


def encode_named_digest(name: str, digest: Digest) -> bytes:
    """DirectoryNode and DirectoryTimesNode share this layout."""
    return _record(1, name.encode()) + _record(2, encode_digest(digest))


def encode_symlink_node(name: str, target: str) -> bytes:
    data = _record(1, name.encode())
    return data + _record(2, target.encode()) if target else data


def encode_file_time(name: str, mtime_ns: int) -> bytes:
    data = _record(1, name.encode())
    # int64 as a varint: negative times (before 1970) take ten bytes, two's complement.
    return data + b"\x10" + _varint(mtime_ns & 0xFFFFFFFFFFFFFFFF) if mtime_ns else data


# -- exclusions ------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> str:
    """Rule 2 as a regex whose matching takes time linear in the path (patterns come from the
    hub: translated as written, `*a*a...*b` or `**/a*/**/a*/...` backtracked for ever, the GIL
    held). Rule 2 is rg's glob syntax without classes, braces or escapes: with `[`, `{` and `\\`
    escaped, the glob module's atomic form matches it."""
    source = atomic_source(re.sub(r"([\\[{])", r"\\\1", pattern))
    assert source is not None  # only braces and classes have none, and none is left
    return source


def check_exclusion_pattern(pattern: str) -> str:
    """`pattern` when rule 2 calls it valid (non-empty, not beginning with "/", no NUL, UTF-8);
    else ValueError saying why, in words for whoever wrote it (an operator's --snapshot-exclude)."""
    example = "give a glob relative to the workspace root, e.g. build/**"
    if not pattern:
        raise ValueError(f"an exclusion pattern may not be empty: {example}")
    if pattern.startswith("/"):
        raise ValueError(f"exclusion pattern {pattern!r} begins with '/', and patterns match paths relative to "
                         f"the workspace root: {example}")
    if "\0" in pattern:
        raise ValueError(f"exclusion pattern {pattern!r} holds a NUL character, which no path does")
    try:
        pattern.encode()
    except UnicodeEncodeError:  # a lone surrogate: a byte of a command line that is not UTF-8
        raise ValueError(f"exclusion pattern {pattern!r} is not valid UTF-8 (names that are not are left out of "
                         "every snapshot already)") from None
    return pattern


class Exclusions:
    """The spec's exclusion patterns (workspace.proto, rule 2) as one compiled regex. Raises
    ValueError for a pattern rule 2 calls invalid (check_exclusion_pattern)."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_EXCLUDES) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            check_exclusion_pattern(pattern)
        regex = "|".join(f"(?:{_pattern_regex(p)})" for p in self.patterns)
        self._match = re.compile(regex, re.DOTALL).fullmatch if regex else None

    def excluded(self, relative: str) -> bool:
        return self._match is not None and self._match(relative) is not None


# -- the tree --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _FileState:
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    mode: int
    digest: Digest
    # Recorded by the process that wrote the file from bytes of that digest (a private tree):
    # no racy-stat doubt about it until its stat changes.
    written: bool = False


@dataclass(slots=True)
class _DirState:
    # (files (name, digest, executable, mtime_ns), directories (name, digest, times digest), symlinks)
    key: tuple
    digest: Digest
    times_digest: Digest
    # This directory's own blobs and file paths, and its subtree's merged (shared, read-only).
    blobs: dict[str, bytes]
    files: dict[str, str]
    file_count: int
    total_bytes: int
    disk_bytes: int


@dataclass(frozen=True)
class Tree:
    """One scan's result: the workspace digest, the times digest, every Directory and
    DirectoryTimes blob by hash, one relative path per file content hash, and what was left out."""

    digest: Digest
    times_digest: Digest
    blobs: dict[str, bytes]
    files: dict[str, str]
    skipped: tuple[str, ...] = ()
    file_count: int = 0
    total_bytes: int = 0
    # The disk its files and directories are counted to take (`disk_bytes`), the root excepted.
    disk_bytes: int = 0


@dataclass
class _Scan:
    now_ns: int
    real_root: bytes
    skipped: list[str] = field(default_factory=list)
    files_seen: list[str] = field(default_factory=list)
    dirs_seen: set[str] = field(default_factory=set)
    # A watched rescan: only `dirty` directories are listed, only `touched` ones (dirty ones and
    # their ancestors) rebuilt.
    partial: bool = False
    dirty: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    fresh: set[str] = field(default_factory=set)
    hashed: int = 0
    listed: int = 0
    # Bytes a watched rescan may still hash before it gives up (ScanTooCostly); None: no bound.
    hash_budget: int | None = None


def open_as_named(path: str | bytes, real_path: str | bytes | None = None) -> BinaryIO | None:
    """The regular file at `path` itself, open for reading, or None. Not what a symlink put in its
    place (O_NOFOLLOW), or in place of a directory above it (the descriptor must be at `real_path`,
    `path` by default, a path with no symlink on the way): a model's background process can swap
    one in between a listing and the read, and the bytes read would be some other file's, perhaps
    outside every workspace. Nor a FIFO: opening one waits for a writer, for ever (O_NONBLOCK
    does not)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    expected = path if real_path is None else real_path
    if not stat.S_ISREG(os.fstat(descriptor).st_mode) or _opened_path(descriptor, expected) not in (expected, None):
        os.close(descriptor)
        return None
    return open(descriptor, "rb", buffering=0)


def _opened_path(descriptor: int, like: str | bytes) -> str | bytes | None:
    """Where an open file really is (str or bytes, as `like`); None without Linux's /proc
    (O_NOFOLLOW still guards the file's own name there)."""
    link = f"/proc/self/fd/{descriptor}"
    try:
        return os.readlink(link if isinstance(like, str) else os.fsencode(link))
    except OSError:
        return None


class ScanTooCostly(Exception):
    """A watched rescan given a `hash_budget` met more bytes to hash (one changed file may be
    huge); it lost nothing: the events it took are back for the next scan. Not an OSError, which
    the scan would take for one entry's and go on."""


class ScanStopped(OSError):
    """The scan was stopped part way: its scanner was closed. An OSError, as the tree could not be
    read; the scan does not treat it as one entry's (which it would leave out and go on)."""


def hash_file(path: str | bytes, real_path: str | bytes | None = None,
              stopped: Callable[[], bool] = lambda: False) -> tuple[Digest, os.stat_result]:
    """The file's digest and the stat of the handle it was read through (taken after reading).
    Raises OSError when `path` is no longer the regular file it was (see `open_as_named`), and
    ScanStopped once `stopped()` (asked between chunks: a file may be huge, or endless)."""
    digest = hashlib.sha256()
    size = 0
    handle = open_as_named(path, real_path)
    if handle is None:
        raise OSError(errno.ESTALE, "no longer the regular file it was listed as (a link, a FIFO, or gone)")
    with handle:
        while chunk := handle.read(_READ_CHUNK):
            if stopped():
                raise ScanStopped(errno.ECANCELED, f"the scan was stopped while hashing {os.fsdecode(path)}")
            digest.update(chunk)
            size += len(chunk)
        after = os.fstat(handle.fileno())
    return Digest(digest.hexdigest(), size), after


class TreeScanner:
    """Scans one workspace again and again, hashing only what changed since the last scan.

    Not thread-safe: one scan at a time (callers run scans in a thread, one after another).
    """

    def __init__(self, root: str, exclusions: Exclusions | None = None, *, watch: bool = True) -> None:
        self.root = root
        self.exclusions = exclusions or Exclusions()
        self._files: dict[str, _FileState] = {}
        self._dirs: dict[str, _DirState] = {}
        self._watcher = _Watcher(self.root) if watch else None
        # Whether rescans can rely on inotify (False: every rescan stats the whole tree).
        self.watching = self._watcher is not None and self._watcher.available
        # Entries hashed and directories listed by the last scan (figures for tests and benchmarks).
        self.last_hashed = 0
        self.last_listed = 0
        self._closed = False

    def close(self) -> None:
        """Closes the watches, and stops a scan running in another thread (it raises ScanStopped):
        a workspace of a huge or endless file (a sparse image, /proc/kcore) holds no thread for ever."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def scan(self, *, full: bool = False, hash_budget: int | None = None) -> Tree:
        """The tree as it is now. Raises OSError when the root cannot be listed, ScanStopped when
        the scanner is closed meanwhile.

        Lists only the directories whose watches saw events, unless `full` or no watch holds. Such
        a scan hashes at most `hash_budget` bytes, else raises ScanTooCostly (for a caller that
        scans on an event loop only what is cheap).
        """
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"not a directory: {self.root}")
        # Files are read at their real path (no symlink on the way), as listed under it.
        work = _Scan(now_ns=time.time_ns(), real_root=os.fsencode(os.path.realpath(self.root)))
        dirty = None if full or self._watcher is None else self._watcher.dirty()
        if dirty is not None and "" in self._dirs:
            work.partial = True
            work.hash_budget = hash_budget
            work.dirty, work.fresh = dirty
            work.dirty |= work.fresh
            work.touched = {""}
            for relative in work.dirty:
                while relative:
                    work.touched.add(relative)
                    relative = relative.rpartition("/")[0]
        elif self._watcher is not None:
            # Everything is listed again: events queued meanwhile are covered by this scan.
            self._watcher.reset()
        try:
            state = self._scan_dir(os.fsencode(self.root), "", work)
        except RecursionError:
            # One frame pair per level: a chain of about 450 directories (a 1 KB path) is past
            # Python's recursion limit. A plain error for the calls that need the snapshot,
            # not an internal one for every call, with a traceback each time.
            raise OSError(errno.ELOOP, "the workspace nests directories too deep to snapshot (a chain of "
                                       "several hundred): flatten it, or run these calls in the server") from None
        except ScanTooCostly:
            # The events it took are given back: the next scan (in a thread) lists what they name
            # again. Lost, it listed the whole tree, at every call after a big file changed.
            assert self._watcher is not None and dirty is not None
            self._watcher.give_back(*dirty)
            raise
        if not work.partial:
            # Forget what vanished, so the caches never grow past the tree.
            seen = set(work.files_seen)
            if len(seen) != len(self._files):
                self._files = {path: s for path, s in self._files.items() if path in seen}
            self._dirs = {path: s for path, s in self._dirs.items() if path in work.dirs_seen}
        self.last_hashed, self.last_listed = work.hashed, work.listed
        return Tree(
            digest=state.digest,
            times_digest=state.times_digest,
            blobs=state.blobs,
            files=state.files,
            skipped=tuple(work.skipped),
            file_count=state.file_count,
            total_bytes=state.total_bytes,
            disk_bytes=state.disk_bytes,
        )

    def _scan_dir(self, path: bytes, relative: str, work: _Scan) -> _DirState:
        cached = self._dirs.get(relative)
        if work.partial and cached is not None and relative not in work.dirty:
            if relative not in work.touched:
                return cached
            # Only something below changed: this directory's own entries are as they were.
            files, links = list(cached.key[0]), list(cached.key[2])
            prefix = relative + "/" if relative else ""
            dirs = [
                (name, self._scan_dir(os.path.join(path, os.fsencode(name)), prefix + name, work))
                for name, _, _ in cached.key[1]
            ]
        else:
            files, dirs, links = self._list_dir(path, relative, work)
            if work.partial and cached is not None:
                self._forget_vanished(relative, cached, files, dirs)
        key = (
            tuple(files),
            tuple((name, d.digest, d.times_digest) for name, d in dirs),
            tuple(links),
        )
        if cached is not None and cached.key == key:
            return cached
        state = self._build_dir(relative, key, files, dirs, links)
        self._dirs[relative] = state
        return state

    def _forget_vanished(self, relative: str, cached: _DirState, files: list, dirs: list) -> None:
        """What a directory listed again no longer holds leaves the caches, a directory with
        everything it held. A watched scan lists only what changed, so the sweep at the end of a
        full scan never comes: without this, every file and directory a workspace ever held (a
        build's output, removed; a test's temporary directories) stayed in memory, with the
        Directory blobs of each subtree, for as long as the scanner lived (weeks, in a server)."""
        prefix = relative + "/" if relative else ""
        present = {name for name, *_ in files}
        for name, *_ in cached.key[0]:
            if name not in present:
                self._files.pop(prefix + name, None)
        present = {name for name, _ in dirs}
        gone = [prefix + name for name, *_ in cached.key[1] if name not in present]
        while gone:
            directory = gone.pop()
            state = self._dirs.pop(directory, None)
            if state is None:
                continue
            below = directory + "/"
            for name, *_ in state.key[0]:
                self._files.pop(below + name, None)
            gone.extend(below + name for name, *_ in state.key[1])

    def _list_dir(self, path: bytes, relative: str, work: _Scan) -> tuple[list, list, list]:
        files: list[tuple[str, Digest, bool, int]] = []
        dirs: list[tuple[str, _DirState]] = []
        links: list[tuple[str, str]] = []
        prefix = relative + "/" if relative else ""
        if self._closed:
            raise ScanStopped(errno.ECANCELED, f"the scan was stopped before listing {relative or '.'}")
        work.listed += 1
        work.dirs_seen.add(relative)
        if self._watcher is not None:
            self._watcher.watch(path, relative)
        with os.scandir(path) as entries:
            listing = list(entries)
        for entry in listing:
            try:
                name = entry.name.decode("utf-8")
            except UnicodeDecodeError:
                work.skipped.append(f"{prefix}{entry.name.decode('utf-8', 'replace')}: name is not valid UTF-8")
                continue
            child = prefix + name
            if self.exclusions.excluded(child):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                mode = info.st_mode
                if stat.S_ISREG(mode):
                    digest = self._file_digest(entry.path, child, info, work)
                    files.append((name, digest, bool(mode & stat.S_IXUSR), info.st_mtime_ns))
                elif stat.S_ISDIR(mode):
                    if work.partial and (child not in self._dirs or relative in work.fresh or child in work.fresh):
                        # Created or moved in since the last scan: listed whole, with everything
                        # under it (a cached state of the same name may be of another directory).
                        work.dirty.add(child)
                        work.fresh.add(child)
                    dirs.append((name, self._scan_dir(entry.path, child, work)))
                elif stat.S_ISLNK(mode):
                    target = os.readlink(entry.path)
                    try:
                        links.append((name, target.decode("utf-8")))
                    except UnicodeDecodeError:
                        work.skipped.append(f"{child}: symlink target is not valid UTF-8")
                else:
                    work.skipped.append(f"{child}: not a regular file, directory or symlink")
            except ScanStopped:
                raise
            except FileNotFoundError:
                # Gone since the listing (a write's temporary file renamed into place): not in the
                # tree, as it is not in the workspace; nothing to warn about.
                continue
            except OSError as exc:
                # Unreadable: left out, and said so.
                work.skipped.append(f"{child}: {exc.strerror or exc}")
        files.sort()
        dirs.sort(key=lambda item: item[0])
        links.sort()
        return files, dirs, links

    def pending(self) -> int | None:
        """Entries the directories the next scan would list held at the last scan (a watched
        scan of a tree scanned before), or None when it would list everything or a directory
        it has not listed yet: lets a caller run a cheap scan without a thread. (Counting the
        directories alone, a rescan of one directory of 100,000 files passed for cheap.)"""
        if self._watcher is None or "" not in self._dirs:
            return None
        dirty = self._watcher.pending()
        if dirty is None:
            return None
        entries = 0
        for relative in dirty:
            state = self._dirs.get(relative)
            if state is None:
                return None
            entries += 1 + len(state.key[0]) + len(state.key[1]) + len(state.key[2])
        return entries

    def record(self, relative: str, digest: Digest, info: os.stat_result) -> None:
        """Tells the stat cache a file's digest (its writer knows it): the next scan need not hash it."""
        self._files[relative] = _FileState(
            info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns, info.st_mode, digest, written=True
        )

    def _file_digest(self, path: bytes, relative: str, info: os.stat_result, work: _Scan) -> Digest:
        work.files_seen.append(relative)
        known = self._files.get(relative)
        if (
            known is not None
            and (known.written or info.st_mtime_ns < work.now_ns - RACY_NS)
            and known.size == info.st_size
            and known.mtime_ns == info.st_mtime_ns
            and known.ino == info.st_ino
            and known.ctime_ns == info.st_ctime_ns
            and known.mode == info.st_mode
        ):
            return known.digest
        if work.hash_budget is not None:
            work.hash_budget -= info.st_size
            if work.hash_budget < 0:
                raise ScanTooCostly(f"{relative} is {info.st_size:,} bytes to hash")
        digest, after = hash_file(path, os.path.join(work.real_root, relative.encode()), lambda: self._closed)
        work.hashed += 1
        # Stat as read: what the next scan compares against (a write during the read shows there).
        self._files[relative] = _FileState(
            after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns, info.st_mode, digest
        )
        return digest

    def _build_dir(self, relative: str, key: tuple, files: list, dirs: list, links: list) -> _DirState:
        prefix = relative + "/" if relative else ""
        content = b"".join(
            [_record(1, encode_file_node(name, digest, executable)) for name, digest, executable, _ in files]
            + [_record(2, encode_named_digest(name, d.digest)) for name, d in dirs]
            + [_record(3, encode_symlink_node(name, target)) for name, target in links]
        )
        times = b"".join(
            [_record(1, encode_file_time(name, mtime)) for name, _, _, mtime in files]
            + [_record(2, encode_named_digest(name, d.times_digest)) for name, d in dirs]
        )
        digest, times_digest = Digest.of(content), Digest.of(times)
        blobs: dict[str, bytes] = {}
        paths: dict[str, str] = {}
        for _, child in dirs:
            blobs.update(child.blobs)
            paths.update(child.files)
        blobs[digest.hash] = content
        blobs[times_digest.hash] = times
        for name, file_digest, _, _ in files:
            paths.setdefault(file_digest.hash, prefix + name)
        count = len(files) + sum(d.file_count for _, d in dirs)
        total = sum(f[1].size for f in files) + sum(d.total_bytes for _, d in dirs)
        disk = sum(disk_bytes(f[1].size) for f in files) + sum(BLOCK_BYTES + d.disk_bytes for _, d in dirs)
        return _DirState(key, digest, times_digest, blobs, paths, count, total, disk)


class _Watcher:
    """inotify watches on the scanned directories (the process's shared instance); `dirty()` says
    which directories had events since the last call, or None when that cannot be known (a watch
    failed, events were lost)."""

    def __init__(self, root: str) -> None:
        problem = shared_inotify.problem()
        if problem:
            # Still correct, only slower: every rescan stats the whole tree.
            log.warning("%s is not watched (%s): its rescans stat every entry", root, problem)
        self.available = not problem
        self._lost = bool(problem)
        # Where each watched directory is now; every descriptor ever added, to forget on close.
        self._paths: dict[int, str] = {}
        self._wds: set[int] = set()
        self._dirty: set[str] = set()
        self._fresh: set[str] = set()

    def watch(self, path: bytes, relative: str) -> None:
        """Watches a directory being listed. A directory already watched gets its watch back
        (inotify returns the inode's descriptor), now mapped to where it is now."""
        if not self.available:
            return
        wd = shared_inotify.add(self, path, relative)
        if isinstance(wd, str):
            # Out of watches (fs.inotify.max_user_watches), or gone: stat everything instead.
            self._lost = True
            return
        self._paths[wd] = relative
        self._wds.add(wd)

    def collect(self) -> None:
        """Takes the events queued so far into the dirty sets."""
        if not self.available:
            return
        events, lost = shared_inotify.take(self)
        if lost:
            self._lost = True
        for event, _ in events:
            if event.mask & inotify_flags.IGNORED:
                # The kernel dropped the watch (its directory was deleted): nothing to forget on close.
                self._wds.discard(event.wd)
            relative = self._paths.get(event.wd)
            if relative is None:
                continue
            if event.mask & (inotify_flags.IGNORED | inotify_flags.DELETE_SELF | inotify_flags.MOVE_SELF):
                # The directory itself went away or moved: its parent saw that too.
                self._paths.pop(event.wd, None)
                self._dirty.add(relative.rpartition("/")[0])
                continue
            self._dirty.add(relative)
            if event.mask & inotify_flags.ISDIR and event.mask & (inotify_flags.CREATE | inotify_flags.MOVED_TO):
                self._fresh.add(f"{relative}/{event.name}" if relative else event.name)

    def pending(self) -> set[str] | None:
        """The directories that had events since the last scan; None when that cannot be known."""
        if not self.available:
            return None
        self.collect()
        return None if self._lost else self._dirty | self._fresh

    def dirty(self) -> tuple[set[str], set[str]] | None:
        """(directories with events, directories created or moved in) since the last call, or None."""
        if not self.available:
            return None
        self.collect()
        dirty, fresh = self._dirty, self._fresh
        self._dirty, self._fresh = set(), set()
        return None if self._lost else (dirty, fresh)

    def give_back(self, dirty: set[str], fresh: set[str]) -> None:
        """Events `dirty()` gave that were not acted on: the next call gives them again."""
        self._dirty |= dirty
        self._fresh |= fresh

    def reset(self) -> None:
        """A full scan follows: forget the events so far, and trust the watches again."""
        if self.available:
            shared_inotify.take(self)
            self._dirty, self._fresh = set(), set()
            self._lost = False

    def close(self) -> None:
        shared_inotify.forget(self, list(self._wds))
        self._paths, self._wds = {}, set()
        self.available = False


def digest_of(root: str, excludes: Sequence[str] = DEFAULT_EXCLUDES) -> Tree:
    """One scan of `root`, without keeping caches."""
    scanner = TreeScanner(root, Exclusions(excludes), watch=False)
    return scanner.scan()


def snapshot_of(workspace: str, excludes: Sequence[str] = DEFAULT_EXCLUDES) -> SnapshotRef:
    """The snapshot of a workspace as it is now (for callers that dispatch to workers themselves)."""
    tree = digest_of(workspace, excludes)
    return SnapshotRef(workspace, tree.digest, tree.times_digest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tool_worker.merkle", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                        help="exclusion pattern (repeatable; default: " + ", ".join(DEFAULT_EXCLUDES) + ")")
    args = parser.parse_args(argv)
    try:
        tree = digest_of(args.directory, DEFAULT_EXCLUDES if args.exclude is None else args.exclude)
    except (OSError, ValueError) as exc:
        print(f"cannot digest {args.directory}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({
        "hash": tree.digest.hash,
        "size_bytes": tree.digest.size,
        "times_hash": tree.times_digest.hash,
        "skipped": list(tree.skipped),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
