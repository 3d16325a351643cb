"""Workspace snapshots on the session server: what every Query call sent to a worker must see.

One `WorkspaceSnapshots` per workspace keeps a `TreeScanner` (stat cache, per-directory cache,
inotify watches) and the latest snapshot. Scans run in a thread, one at a time per workspace,
never on the event loop. The agent asks for a rescan when a step starts (it runs beside the
model request) and after every Execute call (`changed()`); a Query call bound for a worker awaits
`current()`, which returns at once when nothing changed since the last scan. In-process calls
never ask, so they never pay for a snapshot.

Files are not copied anywhere: a snapshot names, for each file content hash, one workspace path
holding it, and the content service reads blobs from there, checking the hash as it reads.
Directory blobs (small) are kept in memory. The last `KEEP_SNAPSHOTS` snapshots of each workspace
stay readable, so a worker fetching a snapshot that was just replaced still finds it.

A workspace's snapshots leave out, besides the server's exclusions, its own: the paths of the
operator's deny list inside it (`workspace_excludes`). No snapshot names them, so the content
service has no path to read them from, an external CAS is never sent them, and no worker on
another host receives them.

Domain logic: no grpc.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tool_worker.merkle import DEFAULT_EXCLUDES, Digest, Exclusions, SnapshotRef, Tree, TreeScanner

log = logging.getLogger(__name__)

KEEP_SNAPSHOTS = 8
# Workspaces whose scanners (and their inotify watches) are kept; the least recently used that no
# running turn holds goes. Held ones are never closed: a turn keeps its workspace's object for its
# whole run, and a closed one fails every scan (a turn's Query calls all failed once 64 other
# workspaces had started turns meanwhile).
MAX_WORKSPACES = 64
# Said once per workspace, not at every scan.
MAX_SKIPPED_LOGGED = 20
# Entries left out that a workspace remembers having warned about (so as to warn once); past it,
# an entry left out long ago may be warned about again.
MAX_SKIPPED_REMEMBERED = 1000
# Threads that scan workspaces, apart from the event loop's default executor: a workspace that
# takes for ever to hash (a huge sparse file, /proc) holds one of these until its scanner closes,
# never a thread the tools and the content service need.
SCAN_THREADS = 4


@functools.cache
def _scan_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="codelane-snapshot")


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of one workspace."""

    workspace: str
    digest: Digest
    times_digest: Digest
    tree: Tree = field(repr=False)
    # The workspace's own exclusions (SnapshotRef.exclude), which a worker needs to compute the
    # same digest.
    exclude: tuple[str, ...] = ()

    @property
    def ref(self) -> SnapshotRef:
        return SnapshotRef(self.workspace, self.digest, self.times_digest, self.exclude)

    def blob(self, hash_hex: str) -> bytes | None:
        """A Directory or DirectoryTimes blob of this snapshot."""
        return self.tree.blobs.get(hash_hex)

    def file_path(self, hash_hex: str) -> str | None:
        """An absolute path that held this content when the snapshot was taken."""
        relative = self.tree.files.get(hash_hex)
        return None if relative is None else os.path.join(self.workspace, relative)


# Called with each new snapshot before it becomes current (e.g. to upload it to an external CAS).
Publisher = Callable[[Snapshot], Awaitable[None]]


class WorkspaceSnapshots:
    """The snapshots of one workspace."""

    def __init__(self, workspace: str, exclusions: Exclusions, publish: Publisher | None = None,
                 exclude: tuple[str, ...] = ()) -> None:
        """`exclusions`: the server's; `exclude`: the workspace's own patterns, matched after them."""
        self.workspace = workspace
        self.exclude = exclude
        self._scanner = TreeScanner(workspace, Exclusions((*exclusions.patterns, *exclude)) if exclude else exclusions)
        self._publish = publish
        self.recent: deque[Snapshot] = deque(maxlen=KEEP_SNAPSHOTS)
        # Changes announced so far (`changed()`, `invalidate()`), and how many of them the latest
        # snapshot holds: `current()` waits for the first scan that started after the changes
        # announced before it, not for the scans to stop.
        self._announced = 0
        self._covered = -1
        self._scanned = asyncio.Event()  # set, and replaced, at the end of each scan
        self._scanning: asyncio.Task[Snapshot] | None = None
        self._skipped_reported: set[str] = set()
        # The other workspaces of the server that overlap this one (one inside the other): set by
        # the registry.
        self.overlapping: Callable[[], Iterable[WorkspaceSnapshots]] = lambda: ()

    @property
    def latest(self) -> Snapshot | None:
        return self.recent[-1] if self.recent else None

    def invalidate(self) -> None:
        """The workspace may have changed: the next `current()` rescans (of every workspace that
        overlaps it too)."""
        self._mark()
        self._invalidate_overlapping()

    def changed(self) -> None:
        """The workspace may have changed (a step starts, an Execute call ended): rescan now, in
        the background; `current()` waits for it (and the next `current()` of every workspace
        that overlaps it rescans)."""
        self._mark()
        self._invalidate_overlapping()
        self._start_scan()

    def _invalidate_overlapping(self) -> None:
        # A write of another session whose workspace holds this one (or lies in it) changed this
        # one too: without this, a call of this workspace named the snapshot its step took before
        # that write had ended, and a worker holding a copy of it read the old file.
        for other in self.overlapping():
            other._mark()

    def _mark(self) -> None:
        self._announced += 1

    def _start_scan(self) -> None:
        if self._scanning is None:
            self._scanning = asyncio.get_running_loop().create_task(self._rescan(), name=f"snapshot {self.workspace}")
            # Its failure reaches whoever awaits current(); a scan nobody waits for fails quietly
            # (it is logged) and the next one tries again.
            self._scanning.add_done_callback(_log_failure)

    async def current(self) -> Snapshot:
        """The snapshot as of now: every change announced before this call is in it.

        Raises OSError when the workspace cannot be read.
        """
        wanted = self._announced
        while True:
            latest = self.latest
            if self._covered >= wanted and latest is not None:
                return latest
            self._start_scan()
            scanning = self._scanning
            assert scanning is not None
            # The end of the next scan, not of the scanning task: while other sessions' calls keep
            # changing the workspace, the task scans again and again, and a call that waited for it
            # to end waited until its deadline.
            scanned = asyncio.ensure_future(self._scanned.wait())
            try:
                await asyncio.wait((scanning, scanned), return_when=asyncio.FIRST_COMPLETED)
            finally:
                scanned.cancel()
            if scanning.done() and self._covered < wanted:
                scanning.result()  # the scan's OSError (a cancelled one: closed)

    async def _rescan(self) -> Snapshot:
        try:
            while True:
                # Changes announced from here on are seen by the next scan (a failed one covers
                # none: the next `current()` scans again).
                covers = self._announced
                tree = await asyncio.get_running_loop().run_in_executor(_scan_executor(), self._scanner.scan)
                snapshot = self.latest
                if snapshot is None or (snapshot.digest, snapshot.times_digest) != (tree.digest, tree.times_digest):
                    snapshot = Snapshot(self.workspace, tree.digest, tree.times_digest, tree, self.exclude)
                    self._report_skipped(tree.skipped)
                    if self._publish is not None:
                        await self._publish(snapshot)
                    self.recent.append(snapshot)
                self._covered = covers
                self._scanned.set()
                self._scanned = asyncio.Event()
                if self._announced == covers:
                    return snapshot
        finally:
            self._scanning = None

    def _report_skipped(self, skipped: Sequence[str]) -> None:
        new = [s for s in skipped if s not in self._skipped_reported]
        if not new:
            return
        if len(self._skipped_reported) + len(new) > MAX_SKIPPED_REMEMBERED:
            # Starts over from what this scan left out: a workspace whose commands make sockets or
            # fifos under new names grew the set for as long as the server kept the workspace.
            self._skipped_reported = set(skipped)
        else:
            self._skipped_reported.update(new)
        shown = "; ".join(new[:MAX_SKIPPED_LOGGED])
        more = f" (and {len(new) - MAX_SKIPPED_LOGGED} more)" if len(new) > MAX_SKIPPED_LOGGED else ""
        log.warning("workspace %s: left out of its snapshot: %s%s", self.workspace, shown, more)

    def close(self) -> None:
        """Forgets the workspace (the server stops): a scan running in a thread stops
        (ScanStopped), its task is cancelled, and whoever waits in `current()` gets CancelledError,
        as the server's other tasks do then."""
        if self._scanning is not None:
            self._scanning.cancel()
        self._scanner.close()


def _log_failure(task: asyncio.Task[Snapshot]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("snapshot of a workspace failed: %s", task.exception())


class SnapshotRegistry:
    """Every workspace's snapshots, and the blobs they name (for the content service)."""

    def __init__(
        self,
        excludes: Sequence[str] = DEFAULT_EXCLUDES,
        publish: Publisher | None = None,
        workspace_excludes: Callable[[str], Sequence[str]] = lambda workspace: (),
    ) -> None:
        """`workspace_excludes(workspace)`: that workspace's own exclusion patterns."""
        self.exclusions = Exclusions(excludes)
        self._publish = publish
        self._workspace_excludes = workspace_excludes
        self._workspaces: dict[str, WorkspaceSnapshots] = {}
        # How many running turns hold each workspace (`of(..., hold=True)` until `release`).
        self._holders: dict[str, int] = {}

    @property
    def excludes(self) -> tuple[str, ...]:
        return self.exclusions.patterns

    def of(self, workspace: str, *, hold: bool = False) -> WorkspaceSnapshots:
        """The workspace's snapshots. With `hold`, they stay open until `release(workspace)`
        (a turn holds its workspace's for its whole run)."""
        snapshots = self._workspaces.pop(workspace, None)
        if snapshots is None:
            snapshots = WorkspaceSnapshots(workspace, self.exclusions, self._publish,
                                           tuple(self._workspace_excludes(workspace)))
            snapshots.overlapping = functools.partial(self._overlapping, workspace)
        self._workspaces[workspace] = snapshots
        if hold:
            self._holders[workspace] = self._holders.get(workspace, 0) + 1
        self._forget_unheld(keep=workspace)
        return snapshots

    def release(self, workspace: str) -> None:
        """A hold of `of(workspace, hold=True)` ends."""
        held = self._holders.get(workspace, 0) - 1
        if held > 0:
            self._holders[workspace] = held
        else:
            self._holders.pop(workspace, None)
        self._forget_unheld()

    def _forget_unheld(self, keep: str = "") -> None:
        """Closes the least recently used workspaces nobody holds, down to MAX_WORKSPACES (or as
        far as the held ones allow: then more stay open until their turns end)."""
        excess = len(self._workspaces) - MAX_WORKSPACES
        if excess > 0:
            unheld = [name for name in self._workspaces if name not in self._holders and name != keep]
            for name in unheld[:excess]:
                self._workspaces.pop(name).close()

    def _overlapping(self, workspace: str) -> list[WorkspaceSnapshots]:
        """The other workspaces kept that hold `workspace` or lie in it (at most MAX_WORKSPACES)."""
        inside = workspace.rstrip("/") + "/"
        return [snapshots for name, snapshots in self._workspaces.items()
                if name != workspace and (name.startswith(inside) or workspace.startswith(name.rstrip("/") + "/"))]

    def find(self, hash_hex: str, *, first_path_only: bool = False) -> tuple[bytes | None, list[str]]:
        """A Directory blob with this hash, or the workspace paths that held such a file (newest
        snapshot first). `first_path_only` stops at the first path: a content service reads that
        one and asks for the others only when it no longer holds the content, so a lookup costs
        one or two dictionary probes instead of one per snapshot of every workspace (64 x 8)."""
        paths: list[str] = []
        for snapshots in reversed(self._workspaces.values()):
            for snapshot in reversed(snapshots.recent):
                blob = snapshot.blob(hash_hex)
                if blob is not None:
                    return blob, []
                path = snapshot.file_path(hash_hex)
                if path is not None and path not in paths:
                    paths.append(path)
                    if first_path_only:
                        return None, paths
        return None, paths

    def close(self) -> None:
        for snapshots in self._workspaces.values():
            snapshots.close()
        self._workspaces.clear()
        self._holders.clear()
