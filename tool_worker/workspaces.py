"""Where a worker runs a call: on the server's own path (shared) or on a copy it keeps (synced).

Every Assign names a snapshot (workspace path, content digest, times digest). `WorkspaceManager`
answers with a `Placement`, the directory the call runs in:

- shared: the path lies under one of the worker's --root (no roots: any path), exists here, and
  the worker's own scan of it (its stat cache) gives the snapshot's digests;
- synced: otherwise, a tree in the worker's cache (`--cache-dir`) moved to the snapshot by writing
  only what differs from what it holds, with blobs from the blob store or the CAS.

A call never runs on another tree: a synced tree is read by calls (readers) or moved to another
snapshot (one writer), never both; when two snapshots of a workspace are wanted at once a second
tree is built. After each move the tree is scanned again and must give the snapshot's digests,
else it is not used. Placing a call on a snapshot the worker already holds is a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from codelane.reapi import remote_execution_pb2 as reapi
from codelane.v1 import workspace_pb2
from tool_worker.blobstore import BlobStore
from tool_worker.cas import DEFAULT_MAX_BATCH_BYTES, Blob, BlobMissing, CasClient, ContentError, SpooledBlob, discard
from tool_worker.fds import write_all
from tool_worker.filelock import try_lock
from tool_worker.merkle import (
    BLOCK_BYTES,
    EMPTY_DIGEST,
    EMPTY_HASH,
    SHARED,
    SYNCED,
    SYNCING,
    UNAVAILABLE,
    Digest,
    Exclusions,
    Holding,
    ScanTooCostly,
    SnapshotRef,
    Tree,
    TreeScanner,
    disk_bytes,
)
from tool_worker.tools.base import ToolResult

log = logging.getLogger("codelane.worker")
T = TypeVar("T")

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "codelane")
DEFAULT_CACHE_SIZE = 10 * 1024**3
# Workers that share a --cache-dir (several on one host, all with the default) each claim a slot
# of it, `<n>/` guarded by a lock on `<n>.lock`: a tree or blob store moved by two processes at
# once would be read half-written. A restarted worker takes the first free slot, so it finds
# the trees and blobs a predecessor left.
MAX_CACHE_SLOTS = 64
# Workspaces a worker keeps state for (a stat cache and inotify watches for the shared check, its
# synced trees); past this the least recently used idle one is forgotten, its trees deleted.
MAX_WORKSPACES = 64
# Trees kept per workspace: one, and a second while calls read the first and another snapshot is
# wanted.
MAX_TREES = 2
# A move this small (the usual edit) runs on the event loop rather than in threads.
SMALL_PLAN_CHANGES = 32
SMALL_PLAN_BYTES = 256 * 1024
# A plan over this many bytes of new Directory and DirectoryTimes blobs (about 1,500 entries)
# is made in a thread: planning 200,000 entries took 3 s, which on the event loop stopped the
# worker's heartbeats (every 2 s).
PLAN_ON_LOOP_BYTES = 64 * 1024
# A watched rescan listing directories of this few entries runs on the event loop too, unless it
# meets more than this many bytes to hash: one file a model made huge for nothing (`truncate -s
# 8G f`) was hashed on the loop for half a minute, the worker's heartbeats stopped and the hub
# dropped it as lost.
CHEAP_SCAN_ENTRIES = 256
CHEAP_SCAN_BYTES = 4 * 1024 * 1024
# Entries (files, directories, symlinks) a sync may create. Directory blobs form a DAG, so a few
# kilobytes of them can name 2^40 paths: each new subtree is counted on the DAG before it is
# walked. Well above any source tree (a large monorepo holds a few hundred thousand).
MAX_SNAPSHOT_ENTRIES = 5_000_000
# Largest Directory (or DirectoryTimes) blob a worker fetches: each is held whole in memory before
# its digest is checked, and no --cache-size counts it. A directory of 600,000 entries fits.
MAX_DIRECTORY_BLOB_BYTES = 64 * 1024 * 1024
# All the new Directory and DirectoryTimes blobs of one snapshot, held in memory together while
# it is planned: about what MAX_SNAPSHOT_ENTRIES entries take (~125 bytes each, both blobs).
# Without it a snapshot of many distinct directories (one level of a thousand, each of a single
# 64 MiB name) had the worker fetch and hold them all before any count could refuse it.
MAX_SNAPSHOT_DIRECTORY_BYTES = 1024 * 1024 * 1024
# A name in a Directory: one path component.
_PLAIN_NAME = re.compile(r"[^/\0]+")
# Arguments that name paths (the built-in tools' and the convention for plugins): absolute paths
# under the server's workspace in them are mapped to the copy.
_PATH_ARGUMENT = re.compile(r"^(?:path|paths|file_path|.*_path|.*_paths)$")


class WorkspaceUnavailable(Exception):
    """The worker cannot present the snapshot; the message says why (it becomes the call's error)."""


class SnapshotChanged(WorkspaceUnavailable):
    """The CAS no longer holds part of the snapshot: the workspace changed after it was taken. The
    call needs a newer snapshot, not another worker."""


class Placement:
    """The directory a call runs in, and how paths map between it and the server's workspace."""

    __slots__ = ("_release", "path", "workspace")

    def __init__(self, workspace: str, path: str, release: Callable[[], None] | None = None) -> None:
        self.workspace = workspace
        self.path = path
        self._release = release

    @property
    def mapped(self) -> bool:
        return self.path != self.workspace

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def arguments(self, arguments_json: str) -> str:
        """Absolute paths under the server's workspace, in path arguments, point to the copy
        (worker.proto, Assign.workspace: the rule a foreign worker follows too)."""
        # Without a backslash the text's strings are its decoded strings: no W and no `..` in it,
        # none to map.
        if not self.mapped or (
            "\\" not in arguments_json and self.workspace not in arguments_json and ".." not in arguments_json
        ):
            return arguments_json
        try:
            arguments = json.loads(arguments_json)
        except (ValueError, RecursionError):
            return arguments_json  # the tool says what is wrong with them
        if not isinstance(arguments, dict):
            return arguments_json
        mapped = {key: self._map_in(value) if _PATH_ARGUMENT.fullmatch(key) else value
                  for key, value in arguments.items()}
        return arguments_json if mapped == arguments else json.dumps(mapped)

    def _map_in(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._map_in(v) for v in value]
        if isinstance(value, str):
            if value == self.workspace:
                return self.path
            base = self.workspace.rstrip("/")  # "" when the workspace is "/"
            if value.startswith(base + "/"):
                return self.path + value[len(base):]
            if value.startswith(".."):
                return _reentered(self.workspace, value)
        return value

    def result(self, result: ToolResult) -> ToolResult:
        """The copy's path, wherever the result shows it (its output, every string of its
        metadata), reads as the server's workspace."""
        if not self.mapped:
            return result
        output = self._map_out(result.output)
        metadata = self._map_out_value(result.metadata)
        if output is result.output and metadata is result.metadata:
            return result
        return dataclasses.replace(result, output=output, metadata=metadata)

    def _map_out(self, text: str) -> str:
        if self.path not in text:
            return text
        # One pass, left to right: the copy followed by "/" becomes the workspace's directory
        # followed by "/" (for a workspace "/", that "/" alone), any other occurrence the workspace.
        base = self.workspace.rstrip("/")
        return re.sub(re.escape(self.path) + "(/?)", lambda m: base + "/" if m[1] else self.workspace, text)

    def _map_out_value(self, value: Any) -> Any:
        """`value` itself when nothing in it names the copy (a result's metadata is most often
        left as it is: rebuilt and compared, every call paid for its whole tree twice)."""
        if isinstance(value, str):
            return self._map_out(value)
        if isinstance(value, dict):
            mapped = {self._map_out_value(k): self._map_out_value(v) for k, v in value.items()}
            same = len(mapped) == len(value) and all(
                k is k2 and v is v2 for (k, v), (k2, v2) in zip(value.items(), mapped.items(), strict=True))
            return value if same else mapped
        if isinstance(value, list | tuple):
            items = [self._map_out_value(v) for v in value]
            return value if all(a is b for a, b in zip(value, items, strict=True)) else items
        if value is None or isinstance(value, bool | int | float):
            return value
        text = str(value)  # what the wire will carry (metadata_json is written with default=str)
        return self._map_out(text) if self.path in text else value


@dataclass(eq=False)
class _Tree:
    path: str
    scanner: TreeScanner
    held: Tree | None = None
    readers: int = 0
    writing: bool = False
    # The snapshot a move is bringing it to.
    target: SnapshotRef | None = None
    # The exclusion patterns its files are known to respect (None: not known, a tree an earlier
    # worker left): a move to a snapshot of other exclusions first deletes what they exclude.
    clean: tuple[str, ...] | None = None
    # The disk it is counted to take against --cache-size (merkle.disk_bytes): what it held at its
    # last scan, and while it moves (or after a move that failed half-way) the most the move
    # leaves there, the tree before or as planned.
    bytes: int = 0

    @property
    def idle(self) -> bool:
        """No call reads it and no move writes it: it may be moved, or deleted."""
        return self.readers == 0 and not self.writing

    def holds(self, snapshot: SnapshotRef) -> bool:
        held = self.held
        return held is not None and held.digest == snapshot.digest and held.times_digest == snapshot.times_digest


@dataclass(eq=False)
class _Workspace:
    trees: list[_Tree] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    shared_scanner: TreeScanner | None = None
    # (digest, times digest) the server's own path was last seen with, when shared.
    shared: tuple[Digest, Digest] | None = None
    # When a call was last placed on it (time.monotonic()): its trees go least recently used first.
    last_used: float = 0.0
    # The workspace's own exclusions (SnapshotRef.exclude), and the server's with them, compiled
    # (None until the first call, and again after a Welcome changed the server's).
    exclude: tuple[str, ...] = ()
    exclusions: Exclusions | None = None


class WorkspaceManager:
    def __init__(
        self,
        *,
        roots: tuple[str, ...] = (),
        cache_dir: str = DEFAULT_CACHE_DIR,
        cache_size: int = DEFAULT_CACHE_SIZE,
        on_change: Callable[[Holding], None] | None = None,
    ) -> None:
        self._roots = roots
        self.cache_dir = os.path.realpath(cache_dir)
        self.cache_size = cache_size
        self._on_change = on_change or (lambda holding: None)
        self.exclusions = Exclusions()
        self.cas: CasClient | None = None
        self._workspaces: dict[str, _Workspace] = {}
        self._store: BlobStore | None = None
        self._slot: str | None = None
        self._slot_lock: int | None = None
        # Trees an earlier worker left in the slot, with their bytes: reused when their workspace
        # comes back, counted against --cache-size until then, and the first to go for room.
        self._orphans: dict[str, int] = {}
        self._opening = asyncio.Lock()
        self.holdings: dict[str, Holding] = {}

    def configure(self, cas: CasClient, excludes: tuple[str, ...]) -> None:
        """From the hub's Welcome. New exclusions change every digest: scanners start over."""
        self.cas = cas
        if excludes != self.exclusions.patterns:
            self.exclusions = Exclusions(excludes)
            for state in self._workspaces.values():
                state.exclusions = None

    def _use_exclusions(self, state: _Workspace, snapshot: SnapshotRef) -> Exclusions:
        """The exclusions `snapshot` is computed with. When they changed (a new Welcome, or the
        server's deny list after a restart), the workspace's scanners start over. Raises
        WorkspaceUnavailable for a pattern the spec does not allow."""
        if state.exclusions is not None and state.exclude == snapshot.exclude:
            return state.exclusions
        try:
            exclusions = Exclusions((*self.exclusions.patterns, *snapshot.exclude))
        except ValueError as exc:
            raise WorkspaceUnavailable(f"the snapshot of {snapshot.workspace} has exclusions this worker cannot "
                                       f"apply: {exc}") from None
        state.exclude, state.exclusions, state.shared = snapshot.exclude, exclusions, None
        if state.shared_scanner is not None:
            state.shared_scanner.close()
            state.shared_scanner = None
        for tree in state.trees:
            # Its next move deletes what the new exclusions leave out (`_move`): a new scanner
            # would not see those files, and the copy would keep them, stale or denied. A tree in
            # use now gets the same once its readers or its move are done.
            if tree.idle:
                tree.held = None
        return exclusions

    async def _open_cache(self) -> None:
        """Claims the slot and reads its blob store, once, in a thread: measuring what an earlier
        worker left there walks every file (seconds for a large cache), which must not stall the
        event loop and its heartbeats."""
        async with self._opening:
            if self._store is None:
                await asyncio.to_thread(lambda: self.store)

    @property
    def store(self) -> BlobStore:
        if self._store is None:
            self._store = BlobStore(os.path.join(self.slot, "blobs"))
        return self._store

    @property
    def slot(self) -> str:
        """This worker's own directory in the cache (see MAX_CACHE_SLOTS), claimed on first use.
        Raises WorkspaceUnavailable when none can be claimed."""
        if self._slot is None:
            self._slot = self._claim_slot()
        return self._slot

    def _claim_slot(self) -> str:
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for index in range(MAX_CACHE_SLOTS):
                lock = try_lock(os.path.join(self.cache_dir, f"{index}.lock"))
                if lock is None:
                    continue
                slot = os.path.join(self.cache_dir, str(index))
                try:
                    os.makedirs(slot, exist_ok=True)
                    _adopt_unslotted(self.cache_dir, slot)
                    self._orphans = _left_trees(os.path.join(slot, "trees"))
                except BaseException:
                    os.close(lock)
                    raise
                self._slot_lock = lock
                return slot
        except OSError as exc:
            raise WorkspaceUnavailable(
                f"the worker cannot use its cache directory {self.cache_dir} ({exc.strerror or exc}): "
                "give it a writable --cache-dir"
            ) from None
        raise WorkspaceUnavailable(
            f"all {MAX_CACHE_SLOTS} slots of the cache directory {self.cache_dir} are held by other running "
            "workers: give this worker a --cache-dir of its own"
        )

    # -- placing a call ----------------------------------------------------------------------------

    async def place(self, snapshot: SnapshotRef) -> Placement:
        """Where to run a call that must see `snapshot`. Raises WorkspaceUnavailable."""
        state = self._workspaces.get(snapshot.workspace)
        if state is not None:
            state.last_used = time.monotonic()
            self._use_exclusions(state, snapshot)
            if state.shared == (snapshot.digest, snapshot.times_digest):
                return Placement(snapshot.workspace, snapshot.workspace)
            for tree in state.trees:
                if not tree.writing and tree.holds(snapshot):
                    return self._read(state, tree, snapshot)
        else:
            # In the map before the first await, so that a call placed meanwhile finds this state.
            state = self._workspaces[snapshot.workspace] = _Workspace(last_used=time.monotonic())
            self._use_exclusions(state, snapshot)
            if len(self._workspaces) > MAX_WORKSPACES:
                await self._forget_least_recently_used(keep=snapshot.workspace)
        if await self._shared_matches(state, snapshot):
            return Placement(snapshot.workspace, snapshot.workspace)
        return await self._synced(state, snapshot)

    def _read(self, state: _Workspace, tree: _Tree, snapshot: SnapshotRef) -> Placement:
        tree.readers += 1

        def release() -> None:
            tree.readers -= 1
            if tree.readers == 0:
                asyncio.get_running_loop().create_task(self._notify(state))

        return Placement(snapshot.workspace, tree.path, release)

    async def _notify(self, state: _Workspace) -> None:
        async with state.changed:
            state.changed.notify_all()

    def _may_share(self, workspace: str) -> bool:
        real = os.path.realpath(workspace)
        if self._roots and not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self._roots):
            return False
        return os.path.isdir(workspace) and not real.startswith(self.cache_dir + os.sep)

    async def _shared_matches(self, state: _Workspace, snapshot: SnapshotRef) -> bool:
        if not await asyncio.to_thread(self._may_share, snapshot.workspace):
            return False
        if state.shared_scanner is None:
            state.shared_scanner = TreeScanner(snapshot.workspace, self._use_exclusions(state, snapshot))
        wanted = (snapshot.digest, snapshot.times_digest)
        for full in (False, True):
            # A watched scan first; when it disagrees, one that stats everything (inotify misses
            # what other hosts of a network filesystem change).
            try:
                if full:
                    tree = await _in_thread(functools.partial(state.shared_scanner.scan, full=True))
                else:
                    tree = await _scan(state.shared_scanner)
            except OSError:
                return False
            seen = (tree.digest, tree.times_digest)
            if seen == wanted:
                state.shared = seen
                self._report(Holding(snapshot.workspace, SHARED, snapshot.digest))
                return True
        state.shared = None
        return False

    async def _synced(self, state: _Workspace, snapshot: SnapshotRef) -> Placement:
        await self._open_cache()
        async with state.changed:
            while True:
                for tree in state.trees:
                    if not tree.writing and tree.holds(snapshot):
                        return self._read(state, tree, snapshot)
                if any(t.writing and t.target == snapshot for t in state.trees):
                    # Another call is bringing a tree to this very snapshot: wait for it.
                    await state.changed.wait()
                    continue
                idle = [t for t in state.trees if t.idle]
                if idle:
                    tree = idle[0]
                elif len(state.trees) < MAX_TREES:
                    taken = {t.path for t in state.trees}
                    tree = self._new_tree(snapshot.workspace, taken, self._use_exclusions(state, snapshot))
                    state.trees.append(tree)
                else:
                    await state.changed.wait()
                    continue
                tree.writing, tree.target, tree.held = True, snapshot, None
                break
        self._report(Holding(snapshot.workspace, SYNCING, snapshot.digest))
        try:
            await self._move(tree, snapshot, self._use_exclusions(state, snapshot))
        except SnapshotChanged:
            raise  # nothing is wrong with this worker: the copy is synced again to a newer snapshot
        except WorkspaceUnavailable as exc:
            self._report(Holding(snapshot.workspace, UNAVAILABLE, snapshot.digest, str(exc)))
            raise
        except Exception as exc:  # a bug must not leave the tree marked as moving, nor the call hanging
            log.exception("moving the copy of %s to %s failed", snapshot.workspace, snapshot.digest)
            reason = f"syncing {snapshot.workspace} failed: {type(exc).__name__}: {exc}"
            self._report(Holding(snapshot.workspace, UNAVAILABLE, snapshot.digest, reason))
            raise WorkspaceUnavailable(reason) from None
        finally:
            tree.writing, tree.target = False, None
            await self._notify(state)
        self._report(Holding(snapshot.workspace, SYNCED, snapshot.digest))
        return await self.place(snapshot)

    def _new_tree(self, workspace: str, taken: set[str], exclusions: Exclusions) -> _Tree:
        key = hashlib.sha256(workspace.encode()).hexdigest()[:16]
        index = 0
        while os.path.realpath(path := os.path.join(self.slot, "trees", f"{key}-{index}")) in taken:
            index += 1
        os.makedirs(path, exist_ok=True)
        path = os.path.realpath(path)
        # An earlier worker's copy of this workspace is moved from there; it may hold what the
        # exclusions of today leave out (the server restarted with others).
        left = self._orphans.pop(path, None)
        return _Tree(path=path, scanner=TreeScanner(path, exclusions), clean=None if left is not None else
                     exclusions.patterns, bytes=left or 0)

    # -- moving a tree -----------------------------------------------------------------------------

    async def _move(self, tree: _Tree, snapshot: SnapshotRef, exclusions: Exclusions) -> None:
        if self.cas is None:
            raise WorkspaceUnavailable("the worker has no content source yet (no Welcome from the hub)")
        started = time.perf_counter()
        if tree.clean != exclusions.patterns:
            # The exclusions changed since it was written: what they now leave out goes (a scanner
            # of the new ones would not see it, so no diff would remove it), then it is scanned
            # afresh with them.
            tree.scanner.close()
            try:
                removed = await _in_thread(_remove_excluded, tree.path, exclusions)
            except OSError as exc:
                raise WorkspaceUnavailable(f"cleaning the copy of {snapshot.workspace} failed: {exc}") from None
            if removed:
                log.info("removed %d paths the exclusions now leave out from the copy of %s", removed,
                         snapshot.workspace)
            tree.scanner = TreeScanner(tree.path, exclusions)
            tree.clean = exclusions.patterns
        current = await _scan(tree.scanner)
        tree.bytes = current.disk_bytes
        try:
            directories = await self._directories(current, snapshot)
            new = sum(len(blob) for digest, blob in directories.items() if digest not in current.blobs)
            if new <= PLAN_ON_LOOP_BYTES:
                plan = _plan(current, snapshot, directories, exclusions)
            else:
                plan = await asyncio.to_thread(_plan, current, snapshot, directories, exclusions)
            planned = time.perf_counter()
            need = plan.disk_bytes
            # Counted at once, before any await: a sync of another workspace running meanwhile
            # counts this one's too (a tree moving counted nothing, and two fitted "on paper").
            tree.bytes = max(current.disk_bytes, need)
            other_trees = self._other_trees(tree)
            if tree.bytes + other_trees > self.cache_size:
                await self._evict_trees(tree.bytes + other_trees - self.cache_size, keep=tree)
                other_trees = self._other_trees(tree)
            if tree.bytes + other_trees > self.cache_size:
                tree.bytes = current.disk_bytes
                raise WorkspaceUnavailable(
                    f"the snapshot of {snapshot.workspace} takes {need} bytes and the worker's other trees "
                    f"{other_trees}: more than its --cache-size of {self.cache_size} bytes"
                )
            # The blob store gets what the trees leave of the bound, before anything is written:
            # the old versions this move takes in count there, the blobs it is about to copy out
            # go last.
            room = self.cache_size - other_trees - tree.bytes
            keep = {digest.hash for digest in plan.writes}
            self.store.prefer(keep)
            self.store.evict(room, keep)
            if plan.small:
                # A few files (the usual edit): a few syscalls, cheaper than thread hops.
                self._prepare(tree, plan, room, keep)
                await self._fill(tree, plan, inline=True)
                self._finish(tree, plan)
            else:
                # Each thread waited for to its end, even by a cancelled sync: the tree is released
                # (idle, for the next move to prepare) only once nothing writes in it.
                await _in_thread(self._prepare, tree, plan, room, keep)
                await self._fill(tree, plan)
                await _in_thread(self._finish, tree, plan)
            self.store.evict(max(0, self.cache_size - need - self._other_trees(tree)))
            written = time.perf_counter()
            held = await _scan(tree.scanner)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The disk holds less than the bound says (or other files share it): the blob
                # store, a cache, goes, so that a retry finds the room the trees need.
                log.warning("the cache disk is full (%s): the blob store (%d bytes) is emptied", exc.strerror,
                            self.store.bytes)
                with contextlib.suppress(OSError):
                    self.store.evict(0)
                raise WorkspaceUnavailable(
                    f"the worker's cache disk is full ({self.cache_dir}: {exc.strerror}); the copy of "
                    f"{snapshot.workspace} was not used. Free space or lower --cache-size"
                ) from None
            raise WorkspaceUnavailable(f"materializing {snapshot.workspace} failed: {exc}") from None
        except BlobMissing as exc:
            raise SnapshotChanged(
                f"{snapshot.workspace} changed after the snapshot {snapshot.digest} was taken ({exc})"
            ) from None
        except ContentError as exc:
            raise WorkspaceUnavailable(f"fetching the snapshot of {snapshot.workspace} failed: {exc}") from None
        if (held.digest, held.times_digest) != (snapshot.digest, snapshot.times_digest):
            raise WorkspaceUnavailable(
                f"the copy of {snapshot.workspace} does not match its snapshot after syncing (digest {held.digest}, "
                f"wanted {snapshot.digest}); it was not used"
            )
        tree.held, tree.bytes = held, held.disk_bytes
        done = time.perf_counter()
        log.info("synced %s to %s: %d files written (%d bytes) in %.3fs: plan %.3fs, fill %.3fs, check %.3fs",
                 snapshot.workspace, snapshot.digest, sum(len(paths) for paths in plan.writes.values()),
                 sum(d.size * len(paths) for d, paths in plan.writes.items()), done - started, planned - started,
                 written - planned, done - written)

    def _other_trees(self, tree: _Tree) -> int:
        """The disk every tree but `tree` is counted to take, moving or failed ones included, with
        what an earlier worker left."""
        return sum(t.bytes for s in self._workspaces.values() for t in s.trees if t is not tree) + sum(
            self._orphans.values())

    async def _directories(self, current: Tree, snapshot: SnapshotRef) -> dict[str, bytes]:
        """Every Directory and DirectoryTimes blob of the snapshot, fetching only those the tree
        does not hold already, one level of the tree per round trip."""
        known = dict(current.blobs)
        known[EMPTY_HASH] = b""
        # (digest, is a content Directory rather than a DirectoryTimes)
        frontier = [(snapshot.digest, True), (snapshot.times_digest, False)]
        fetched = 0
        while frontier:
            missing = list({d.hash: d for d, _ in frontier if d.hash not in known}.values())
            oversized = [d for d in missing if not 0 <= d.size <= MAX_DIRECTORY_BLOB_BYTES]
            if oversized:
                raise ContentError(f"the snapshot names directory blob {oversized[0]}, larger than the "
                                   f"{MAX_DIRECTORY_BLOB_BYTES:,} bytes a directory may take (or of a negative size)")
            # Counted before the fetch, from the sizes the digests state (the CAS client holds a
            # blob to its stated size).
            fetched += sum(d.size for d in missing)
            if fetched > MAX_SNAPSHOT_DIRECTORY_BYTES:
                raise ContentError(f"the snapshot's new directory blobs take more than the "
                                   f"{MAX_SNAPSHOT_DIRECTORY_BYTES:,} bytes a worker holds to plan a sync")
            if missing:
                assert self.cas is not None
                known.update(await self.cas.read(missing))
            next_level: dict[tuple[str, bool], tuple[Digest, bool]] = {}
            for digest, content in frontier:
                blob = known[digest.hash]
                kind = reapi.Directory if content else workspace_pb2.DirectoryTimes
                try:
                    nodes = kind.FromString(blob).directories
                except Exception:
                    raise ContentError(f"blob {digest} is not a {kind.__name__}") from None
                for node in nodes:
                    child = Digest(node.digest.hash, node.digest.size_bytes)
                    # A known directory comes with its whole subtree (the tree held has it all).
                    if child.hash not in known:
                        next_level[(child.hash, content)] = (child, content)
            frontier = list(next_level.values())
        return known

    async def _forget_least_recently_used(self, keep: str) -> None:
        idle = [(state.last_used, workspace) for workspace, state in self._workspaces.items()
                if workspace != keep and all(tree.idle for tree in state.trees)]
        if not idle:
            return  # every one is in use: kept, past the bound, until they are not
        _, workspace = min(idle)
        state = self._workspaces.pop(workspace)
        self._report(Holding(workspace, UNAVAILABLE, None, f"forgotten: the worker keeps {MAX_WORKSPACES} workspaces"))
        self.holdings.pop(workspace, None)
        if state.shared_scanner is not None:
            state.shared_scanner.close()
        await _delete([_retire(tree) for tree in state.trees])

    async def _evict_trees(self, excess: int, keep: _Tree) -> int:
        """Deletes idle trees (no reader, not moving), least recently used workspace first, until
        `excess` bytes are freed or none is left; returns the bytes freed. A workspace not used for
        a while must not keep a new one out of the cache for ever."""
        idle = sorted(
            ((state.last_used, workspace, state, tree) for workspace, state in self._workspaces.items()
             for tree in state.trees
             if tree is not keep and tree.idle),
            key=lambda entry: entry[0],
        )
        freed, doomed = 0, []
        while self._orphans and freed < excess:  # unused since before this worker started
            path, size = self._orphans.popitem()
            freed += size
            doomed.append(_retire_path(path))
        for _, workspace, state, tree in idle:
            if freed >= excess:
                break
            freed += tree.bytes
            state.trees.remove(tree)
            log.info("evicting the copy of %s (%d bytes) to make room in the cache", workspace, tree.bytes)
            doomed.append(_retire(tree))
            if not state.trees and state.shared is None:
                self._report(Holding(workspace, UNAVAILABLE, None, "its copy was evicted to make room in the cache"))
        await _delete(doomed)
        return freed

    def _prepare(self, tree: _Tree, plan: _Plan, room: int, keep: set[str]) -> None:
        """Removes what goes (old file versions move into the blob store, within `room` bytes,
        `keep` kept there) and makes directories."""
        store = self.store
        for relative, digest in plan.remove:
            path = os.path.join(tree.path, relative)
            if digest is None:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            else:
                store.take_in(path, digest, room, keep)
        for relative in plan.mkdir:
            path = os.path.join(tree.path, relative)
            os.makedirs(path, exist_ok=True)
            # A symlink the scan does not see (under an excluded path, or one a case-insensitive
            # filesystem takes for this name) passed for the directory: what the snapshot puts
            # under it went wherever it points, outside the tree.
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                _through_link(relative)

    async def _fill(self, tree: _Tree, plan: _Plan, *, inline: bool = False) -> None:
        """Writes every new file: from the blob store when it has the content, else fetched."""
        local = self._fill_local(tree, plan) if inline else await _in_thread(self._fill_local, tree, plan)
        missing = [d for d in plan.writes if d.hash not in local]
        if not missing:
            return
        assert self.cas is not None
        # One batch written at a time, in one thread, while the next ones arrive. Several writer
        # threads were slower: each file is five system calls, each releases and takes back the
        # GIL, and with other threads waiting every one of them became a context switch (a quarter
        # of the worker's time in futex wake-ups; docs/workspaces.md).
        writing: asyncio.Future[None] | None = None
        try:
            # Closed on the way out, so that no fetch outlives the sync (an error, a cancel).
            async with contextlib.aclosing(self.cas.fetch(missing, spool=self.store.spool_path)) as batches:
                async for batch in batches:
                    if inline:
                        self._write_batch(tree, plan, batch)
                        continue
                    if writing is not None:
                        try:
                            # Shielded: a cancelled sync must not stop waiting while the thread writes.
                            await asyncio.shield(writing)
                        except BaseException:
                            for _, blob in batch:
                                discard(blob)
                            raise
                    writing = asyncio.ensure_future(asyncio.to_thread(self._write_batch, tree, plan, batch))
        finally:
            # The last write is waited for here too. Never leave a thread writing into a tree the
            # next sync may prepare. A write that failed (the cache disk full) says more than a
            # fetch that failed beside it, unless the sync was cancelled.
            if writing is not None:
                failure = await _settled(writing)
                task = asyncio.current_task()
                if failure is not None and not (task is not None and task.cancelling()):
                    raise failure

    def _fill_local(self, tree: _Tree, plan: _Plan) -> set[str]:
        done = set()
        for digest in plan.writes:
            data: Blob | None
            if digest == EMPTY_DIGEST:
                data = b""
            elif digest.hash not in self.store:
                continue
            elif digest.size > DEFAULT_MAX_BATCH_BYTES:
                # Copied out a piece at a time: a large blob (a model's weights) is never in memory.
                spooled = self.store.spool_path(digest)
                data = SpooledBlob(spooled) if self.store.copy_out(digest, spooled) else None
            else:
                data = self.store.read(digest)
            if data is not None:
                self._write_batch(tree, plan, [(digest, data)])
                done.add(digest.hash)
        return done

    def _write_batch(self, tree: _Tree, plan: _Plan, batch: list[tuple[Digest, Blob]]) -> None:
        for index, (digest, data) in enumerate(batch):
            if isinstance(data, SpooledBlob):
                try:
                    self._place_spooled(tree, plan, digest, data)
                except BaseException:
                    for _, left in batch[index:]:
                        discard(left)
                    raise
                continue
            for relative, executable, mtime_ns in plan.writes[digest]:
                path = os.path.join(tree.path, relative)
                try:
                    # O_NOFOLLOW: a symlink in the file's place (see `_prepare`) is not written through.
                    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                                         0o777 if executable else 0o666)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        _through_link(relative)
                    raise
                try:
                    write_all(descriptor, data)
                    os.utime(descriptor, ns=(mtime_ns, mtime_ns))
                    tree.scanner.record(relative, digest, os.fstat(descriptor))
                finally:
                    os.close(descriptor)

    @staticmethod
    def _place_spooled(tree: _Tree, plan: _Plan, digest: Digest, blob: SpooledBlob) -> None:
        """The spooled file becomes the blob's first path by a rename; its other paths are copies
        of that one. The spool was made with mode 0o666 less the umask, as `_write_batch` makes
        a file; an executable one gains x wherever it has r (0o777 less the same umask)."""
        first = None
        try:
            for relative, executable, mtime_ns in plan.writes[digest]:
                path = os.path.join(tree.path, relative)
                if first is None:
                    os.replace(blob.path, path)
                    first = path
                else:
                    if os.path.islink(path):  # copyfile would write through it (see `_prepare`)
                        _through_link(relative)
                    shutil.copyfile(first, path)
                mode = os.lstat(path).st_mode & 0o7777
                if executable:
                    os.chmod(path, mode | (mode & 0o444) >> 2)
                os.utime(path, ns=(mtime_ns, mtime_ns))
                tree.scanner.record(relative, digest, os.lstat(path))
        finally:
            if first is None:
                discard(blob)

    def _finish(self, tree: _Tree, plan: _Plan) -> None:
        for relative, target in plan.symlinks:
            os.symlink(target, os.path.join(tree.path, relative))
        for relative, executable in plan.chmod:
            path = os.path.join(tree.path, relative)
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o111 if executable else mode & ~0o111)
        for relative, mtime_ns in plan.utimes:
            os.utime(os.path.join(tree.path, relative), ns=(mtime_ns, mtime_ns))

    # -- reports -----------------------------------------------------------------------------------

    def _report(self, holding: Holding) -> None:
        if self.holdings.get(holding.workspace) != holding:
            self.holdings[holding.workspace] = holding
            self._on_change(holding)

    def close(self) -> None:
        for state in self._workspaces.values():
            if state.shared_scanner is not None:
                state.shared_scanner.close()
            for tree in state.trees:
                tree.scanner.close()
        if self._slot_lock is not None:
            os.close(self._slot_lock)  # the slot is free for the next worker
            self._slot_lock = None
            self._slot = None
            self._store = None
            self._orphans = {}


_RETIRED = ".evicted-"


def _through_link(relative: str) -> None:
    raise WorkspaceUnavailable(
        f"the snapshot names {relative!r} where the copy holds a symlink its scan does not see (an excluded path, "
        "or a name a case-insensitive filesystem takes for another): nothing is written through it; it was not used"
    )


def _reentered(workspace: str, relative: str) -> str:
    """`relative` without the climb out of `workspace` and back into it by its own names
    (`../ws/src/a.py` for `/srv/ws` is `src/a.py`), or as it is when it does not come back. On
    the server it reads the same either way; on a copy, whose directory has another name, the
    climb led out of it (worker.proto, Assign.workspace)."""
    names = [name for name in workspace.split("/") if name]
    parts = relative.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    depth = max(0, len(names) - ups)  # above the root is the root
    rest = parts[ups:]
    while depth < len(names):
        while rest and rest[0] in ("", "."):
            rest = rest[1:]
        if not rest or rest[0] != names[depth]:
            return relative
        rest = rest[1:]
        depth += 1
    return "/".join(rest) or "."


def _retire(tree: _Tree) -> str | None:
    """Takes a tree out of use: its watches closed, its directory renamed away (before any await,
    so that no call meets it and a new tree may take its name). Returns where it went, to delete."""
    tree.scanner.close()
    return _retire_path(tree.path)


def _retire_path(path: str) -> str | None:
    retired = f"{path}{_RETIRED}{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, retired)
    except OSError as exc:
        log.warning("cannot remove the copy %s: %s", path, exc)
        return None
    return retired


def _adopt_unslotted(cache_dir: str, slot: str) -> None:
    """Moves into `slot` the trees and blob store a worker from before the slots (up to
    2026-12-04) kept in the cache directory itself: left there, an upgraded worker never reused,
    counted or deleted them (up to --cache-size of disk lost on each host). The first slot claimed
    takes them; one that already has its own deletes them. A worker that old takes no lock: it
    must not run on this cache directory with slotted ones, which it would write under too."""
    for name in ("trees", "blobs"):
        unslotted = os.path.join(cache_dir, name)
        if not os.path.isdir(unslotted) or os.path.islink(unslotted):
            continue
        try:
            os.rename(unslotted, os.path.join(slot, name))  # onto nothing or an empty directory
        except FileNotFoundError:
            continue  # a worker starting beside this one took them first (raised, this one did not start)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(unslotted, ignore_errors=True)
        log.info("took over the %s an earlier worker left in %s", name, unslotted)


def _left_trees(directory: str) -> dict[str, int]:
    """The trees an earlier worker left in `directory`, with the bytes of their files; what it was
    deleting when it stopped is deleted now."""
    left: dict[str, int] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return left
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if _RETIRED in entry.name:
            shutil.rmtree(entry.path, ignore_errors=True)
            continue
        size = 0
        for parent, directories, files in os.walk(entry.path):
            size += BLOCK_BYTES * len(directories)
            for name in files:
                with contextlib.suppress(OSError):
                    size += disk_bytes(os.lstat(os.path.join(parent, name)).st_size)
        left[os.path.realpath(entry.path)] = size
    return left


async def _delete(paths: list[str | None]) -> None:
    """Deletes retired trees, in one thread hop."""
    doomed = [path for path in paths if path is not None]
    if doomed:
        await asyncio.to_thread(lambda: [shutil.rmtree(path, ignore_errors=True) for path in doomed])


def _remove_excluded(root: str, exclusions: Exclusions) -> int:
    """Deletes every path under `root` that `exclusions` leave out (a directory with all under it);
    returns how many. Without recursion: a tree may be deeper than the interpreter's stack."""
    removed = 0
    stack = [(root, "")]
    while stack:
        path, relative = stack.pop()
        with os.scandir(path) as entries:
            listing = list(entries)
        for entry in listing:
            child = f"{relative}/{entry.name}" if relative else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if exclusions.excluded(child):
                if is_dir:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
            elif is_dir:
                stack.append((entry.path, child))
    return removed


async def _scan(scanner: TreeScanner) -> Tree:
    pending = scanner.pending()
    if pending is not None and pending <= CHEAP_SCAN_ENTRIES:
        try:
            return scanner.scan(hash_budget=CHEAP_SCAN_BYTES)
        except ScanTooCostly:
            pass  # scanned again, in a thread
    return await _in_thread(scanner.scan)


async def _in_thread(function: Callable[..., T], *arguments: Any) -> T:
    """`function(*arguments)` in a thread, waited for to its end even when the caller is cancelled
    (then cancelled once it ended): a thread cannot be stopped, and one still writing into a tree
    (or scanning it) must not run beside the next move of it."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *arguments))
    failure = await _settled(future)
    if failure is not None:
        raise failure
    return future.result()


async def _settled(future: asyncio.Future[Any]) -> BaseException | None:
    """Waits until `future` is done, even if the waiting task is cancelled meanwhile (that
    cancellation is raised once it is done), and returns its exception, retrieved."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    failure = None if future.cancelled() else future.exception()
    if cancelled:
        raise asyncio.CancelledError
    return failure


@dataclass
class _Plan:
    # (relative path, digest of the file to keep in the store, or None: delete)
    remove: list[tuple[str, Digest | None]] = field(default_factory=list)
    mkdir: list[str] = field(default_factory=list)
    # digest -> (relative path, executable, mtime_ns) of every file to write with that content
    writes: dict[Digest, list[tuple[str, bool, int]]] = field(default_factory=dict)
    symlinks: list[tuple[str, str]] = field(default_factory=list)
    chmod: list[tuple[str, bool]] = field(default_factory=list)
    utimes: list[tuple[str, int]] = field(default_factory=list)
    # The disk the tree is counted to take once moved (merkle.disk_bytes).
    disk_bytes: int = 0
    # Entries of the new subtrees, and each distinct new Directory's count (`_entry_count`).
    new_entries: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def small(self) -> bool:
        """Few changes and few bytes to write: done on the event loop."""
        changes = (len(self.remove) + len(self.mkdir) + len(self.symlinks) + len(self.chmod) + len(self.utimes)
                   + sum(map(len, self.writes.values())))
        return changes <= SMALL_PLAN_CHANGES and sum(d.size for d in self.writes) <= SMALL_PLAN_BYTES


def _plan(current: Tree, snapshot: SnapshotRef, blobs: dict[str, bytes], exclusions: Exclusions) -> _Plan:
    """What turns the tree held (`current`) into the snapshot's; `disk_bytes` starts from what is
    held and follows the changes, so planning costs what changed, not the tree's size.

    WorkspaceUnavailable for a snapshot naming a path its `exclusions` leave out, which no scan
    puts in one: written, it stayed in the copy unseen by every later scan (so no check refused
    the snapshots after it) and readable by the tools run there."""
    plan = _Plan(disk_bytes=current.disk_bytes)
    try:
        _diff(plan, "", current.blobs.get(current.digest.hash), current.blobs.get(current.times_digest.hash),
              blobs[snapshot.digest.hash], blobs[snapshot.times_digest.hash], current.blobs, blobs)
    except _TooManyEntries:
        raise WorkspaceUnavailable(
            f"the snapshot {snapshot.digest} of {snapshot.workspace} names more than {MAX_SNAPSHOT_ENTRIES:,} new "
            "entries (files, directories and symlinks): more than a worker materializes; it was not used"
        ) from None
    except RecursionError:
        # One frame per level: past a thousand levels, deeper than any snapshot a server's scan
        # makes (merkle.TreeScanner.scan stops at several hundred). A plain refusal, not a bug of
        # the worker with a traceback.
        raise WorkspaceUnavailable(
            f"the snapshot {snapshot.digest} of {snapshot.workspace} nests directories deeper than a worker "
            "materializes (a chain of about a thousand); it was not used"
        ) from None
    written = (*plan.mkdir, *(path for paths in plan.writes.values() for path, _, _ in paths),
               *(path for path, _ in plan.symlinks))
    left_out = next((path for path in written if exclusions.excluded(path)), None)
    if left_out is not None:
        raise WorkspaceUnavailable(
            f"the snapshot {snapshot.digest} of {snapshot.workspace} names {left_out!r}, which its exclusions "
            f"({', '.join(exclusions.patterns)}) leave out: no scan makes such a snapshot; it was not used"
        )
    return plan


class _TooManyEntries(Exception):
    pass


def _entries(content: bytes | None, times: bytes | None):
    """A Directory and its DirectoryTimes as dictionaries by name. ContentError for a name that is
    not one plain path component, or that repeats: a tree may only write inside itself."""
    directory = reapi.Directory.FromString(content) if content else reapi.Directory()
    file_times = workspace_pb2.DirectoryTimes.FromString(times) if times else workspace_pb2.DirectoryTimes()
    names = [n.name for n in (*directory.files, *directory.directories, *directory.symlinks)]
    if len(set(names)) != len(names) or any(not _PLAIN_NAME.fullmatch(n) or n in (".", "..") for n in names):
        raise ContentError(f"a directory of the snapshot has a malformed or repeated name among {names[:20]}")
    # No symlink holds an empty target or a NUL (readlink gives neither): os.symlink refused the
    # NUL with a ValueError once the files were written, taken for a bug of the worker.
    bad = [s.name for s in directory.symlinks if not s.target or "\0" in s.target]
    if bad:
        raise ContentError(f"a directory of the snapshot has a malformed (empty, or NUL) symlink target for {bad[:20]}")
    # Sizes count against --cache-size as they are planned: a negative one would hide a huge one.
    bad = [n.name for n in (*directory.files, *directory.directories) if n.digest.size_bytes < 0]
    if bad:
        raise ContentError(f"a directory of the snapshot has a malformed (negative) size for {bad[:20]}")
    mtimes = {t.name: t.mtime_ns for t in file_times.files}
    dir_times = {t.name: Digest(t.digest.hash, t.digest.size_bytes) for t in file_times.directories}
    files = {f.name: (Digest(f.digest.hash, f.digest.size_bytes), f.is_executable, mtimes.get(f.name, 0))
             for f in directory.files}
    dirs = {d.name: (Digest(d.digest.hash, d.digest.size_bytes), dir_times.get(d.name)) for d in directory.directories}
    links = {s.name: s.target for s in directory.symlinks}
    return files, dirs, links


def _diff(plan: _Plan, prefix: str, old_content: bytes | None, old_times: bytes | None,
          new_content: bytes, new_times: bytes, old_blobs: dict[str, bytes], new_blobs: dict[str, bytes],
          counted: bool = False) -> None:
    """`counted`: a directory of a new subtree, whose entries were counted with it."""
    old_files, old_dirs, old_links = _entries(old_content, old_times)
    new_files, new_dirs, new_links = _entries(new_content, new_times)
    if not counted:
        # The files and symlinks a directory that stays (the root always) gains count too: only
        # new subtrees were counted, so one root Directory blob wrote 600,000 files unbounded.
        plan.new_entries += sum(1 for name, (digest, _, _) in new_files.items()
                                if name not in old_files or old_files[name][0] != digest)
        plan.new_entries += sum(1 for name, target in new_links.items() if old_links.get(name) != target)
        if plan.new_entries > MAX_SNAPSHOT_ENTRIES:
            raise _TooManyEntries
    for name, (digest, _, _) in old_files.items():
        if name not in new_files or new_files[name][0] != digest:
            plan.remove.append((prefix + name, digest))
            plan.disk_bytes -= disk_bytes(digest.size)
    for name, (digest, _) in old_dirs.items():
        if name not in new_dirs:
            plan.remove.append((prefix + name, None))
            plan.disk_bytes -= BLOCK_BYTES + _tree_bytes(digest, old_blobs)
    for name, target in old_links.items():
        if new_links.get(name) != target:
            plan.remove.append((prefix + name, None))
    for name, (digest, executable, mtime) in new_files.items():
        old = old_files.get(name)
        if old is None or old[0] != digest:
            plan.writes.setdefault(digest, []).append((prefix + name, executable, mtime))
            plan.disk_bytes += disk_bytes(digest.size)
            continue
        if old[1] != executable:
            plan.chmod.append((prefix + name, executable))
        if old[2] != mtime:
            plan.utimes.append((prefix + name, mtime))
    for name, target in new_links.items():
        if old_links.get(name) != target:
            plan.symlinks.append((prefix + name, target))
    for name, (digest, times_digest) in new_dirs.items():
        old = old_dirs.get(name)
        if old is None:
            # Walked whole below: counted first, on the DAG, so that a few blobs naming one
            # subtree at 2^40 paths never make a walk of 2^40 steps.
            plan.new_entries += 1 + _entry_count(digest, new_blobs, plan.counts)
            if plan.new_entries > MAX_SNAPSHOT_ENTRIES:
                raise _TooManyEntries
            plan.mkdir.append(prefix + name)
            plan.disk_bytes += BLOCK_BYTES
        elif old == (digest, times_digest):
            continue
        _diff(plan, f"{prefix}{name}/",
              old_blobs.get(old[0].hash) if old else None,
              old_blobs.get(old[1].hash) if old and old[1] else None,
              new_blobs[digest.hash], new_blobs[times_digest.hash] if times_digest else b"", old_blobs, new_blobs,
              counted=counted or old is None)


def _entry_count(root: Digest, blobs: dict[str, bytes], counts: dict[str, int]) -> int:
    """How many entries the tree under `root` holds, a shared subtree counted wherever it appears,
    in one visit of each Directory not in `counts` (which keeps the counts, capped just past
    MAX_SNAPSHOT_ENTRIES). Without recursion: a tree may be deeper than the interpreter's stack."""
    stack = [root.hash]
    while stack:
        digest = stack[-1]
        if digest in counts:
            stack.pop()
            continue
        directory = reapi.Directory.FromString(blobs[digest]) if blobs[digest] else reapi.Directory()
        children = [node.digest.hash for node in directory.directories]
        unseen = [child for child in children if child not in counts]
        if unseen:
            stack.extend(unseen)
            continue
        stack.pop()
        total = len(directory.files) + len(directory.symlinks) + sum(1 + counts[child] for child in children)
        counts[digest] = min(total, MAX_SNAPSHOT_ENTRIES + 1)
    return counts[root.hash]


def _tree_bytes(digest: Digest, blobs: dict[str, bytes]) -> int:
    blob = blobs.get(digest.hash)
    if not blob:
        return 0
    directory = reapi.Directory.FromString(blob)
    return sum(disk_bytes(f.digest.size_bytes) for f in directory.files) + sum(
        BLOCK_BYTES + _tree_bytes(Digest(d.digest.hash, d.digest.size_bytes), blobs) for d in directory.directories
    )


__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_CACHE_SIZE",
    "SHARED",
    "SYNCED",
    "SYNCING",
    "UNAVAILABLE",
    "Holding",
    "Placement",
    "SnapshotRef",
    "WorkspaceManager",
    "WorkspaceUnavailable",
]

