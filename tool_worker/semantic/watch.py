"""Whether a workspace changed since its index was refreshed, known without looking at its files.

A refresh lists the tree with rg and stats every listed file: at 5,000 files about 60 ms on the
development machine, most of a query. `TreeWatch` keeps inotify watches on the tree's
directories (hidden ones excepted: rg never lists what is in them), and stats the few ignore
files outside them that rg reads (the root's ancestors', the repository's excludes, git's global
ones). A refresh whose listing began after `arm()`, followed by no event and no change of those
files, proves the index current: the call skips rg and the stats.

Read-your-writes holds: the kernel queues an inotify event before the system call that caused it
(a write, create, delete, rename, chmod) returns, so a change made before a call starts is in
the queue when the call asks whether anything changed.

inotify does not see writes through a shared mmap, through a hard link from outside the tree,
nor changes made by other hosts of a network filesystem; a root on a filesystem not known to be
local is never watched. The ignore files
outside the tree are compared by their stat (a same-size rewrite within one tick of the
filesystem's clock would go unseen), and a `core.excludesFile` other than git's default is not
looked at. When watches run out (`fs.inotify.max_user_watches`), the tree has more than
MAX_WATCHED_DIRECTORIES directories, or the event queue overflows, the watch says it cannot
tell, and calls list and stat the tree as they would without it.
"""

from __future__ import annotations

import logging
import os
import threading

from tool_worker.inotify import flags as inotify_flags
from tool_worker.inotify import shared_inotify as _inotify

log = logging.getLogger("codelane.semantic")

# Past this many directories a tree is not watched (each watch costs the kernel about 1 KiB, and
# the user's watches are shared with every other process).
MAX_WATCHED_DIRECTORIES = 20_000
# Files that change what rg lists without being listed themselves.
IGNORE_FILES = frozenset({".gitignore", ".ignore", ".rgignore"})
# Filesystems whose changes all pass through this kernel, so inotify sees them. Anything else
# (nfs, cifs, fuse, 9p, ...) may change under it unseen.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs", "overlay", "bcachefs", "jfs", "reiserfs"}
)


class TreeWatch:
    """inotify watches on one workspace tree. Thread-safe."""

    def __init__(self, root: str, max_directories: int = MAX_WATCHED_DIRECTORIES) -> None:
        self._root = root
        self._max_directories = max_directories
        self._lock = threading.Lock()
        # Why the tree cannot be watched; set once, for good.
        self._unwatchable = "" if inotify_flags is not None else "inotify is not available on this platform"
        self._checked_filesystem = False
        # The watch descriptors of the tree's directories.
        self._wds: set[int] = set()
        # The ignore files outside the watched directories, and their stat when last armed.
        self._outside = _outside_ignore_files(root)
        self._outside_seen: list[tuple[int, int, int, int] | None] = []
        # Set by any event that may change what a refresh finds, cleared by `arm()`.
        self._dirty = True
        # Directories created or moved into the tree since the last `arm()`: watched by the next.
        self._fresh: list[str] = []
        # Events were lost or a directory moved: the next `arm()` watches the tree anew.
        self._lost = True
        # The root directory's (device, inode) when last armed: another directory at the root's
        # path (the old one moved away with a parent, or deleted) sends no event to the watches.
        self._root_identity: tuple[int, int] | None = None

    def quiet(self) -> bool:
        """True when nothing that a refresh would see changed since the last `arm()`. Never
        waits: False while an `arm()` is under way."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._unwatchable or self._dirty or self._lost:
                return False  # the events waiting are read by the next `arm()`, in its thread
            self._collect()
            return (
                not self._dirty
                and not self._lost
                and _signatures(self._outside) == self._outside_seen
                and _identity(self._root) == self._root_identity
            )
        finally:
            self._lock.release()

    def arm(self) -> None:
        """Called before the tree is listed: watches the directories not watched yet and forgets
        the changes so far (the listing that follows sees them); from now on any change makes
        the watch dirty. Walks the whole tree the first time."""
        with self._lock:
            if not self._checked_filesystem:
                self._checked_filesystem = True
                self._unwatchable = self._unwatchable or _not_local(self._root)
                if self._unwatchable:
                    log.info("%s is not watched (%s): every semantic_search lists and stats it", self._root,
                             self._unwatchable)
            if self._unwatchable:
                return
            self._collect()
            identity = _identity(self._root)
            if identity != self._root_identity:
                self._lost, self._root_identity = True, identity
            if self._lost:
                self._start_over()
            while self._fresh and not self._unwatchable:
                fresh, self._fresh = self._fresh, []
                for directory in fresh:
                    self._watch_tree(directory)
                self._collect()
            self._outside_seen = _signatures(self._outside)
            self._dirty = False

    def close(self) -> None:
        with self._lock:
            _inotify.forget(self, list(self._wds))
            self._wds = set()
            self._unwatchable = self._unwatchable or "closed"

    # -- caller holds the lock -------------------------------------------------------------------

    def _start_over(self) -> None:
        """Watches the whole tree anew: old watches may know moved directories by old paths."""
        _inotify.forget(self, list(self._wds))
        self._wds = set()
        self._fresh = []
        self._watch_tree(self._root)
        # A root that is not there (yet) is not watched: nothing is proven until it is.
        self._lost = not self._wds and not self._unwatchable

    def _collect(self) -> None:
        events, overflowed = _inotify.take(self)
        if overflowed:
            self._lost = self._dirty = True
        for event, directory in events:
            if event.mask & inotify_flags.IGNORED:
                # The watch went with its directory (deleted); its parent saw that too. The root
                # has no watched parent to see it made again: the next `arm()` starts over.
                self._wds.discard(event.wd)
                self._dirty = True
                if directory == self._root:
                    self._lost = True
                continue
            if event.mask & inotify_flags.MOVE_SELF:
                # A moved directory's watches would report under its old path.
                self._lost = self._dirty = True
                continue
            if event.name.startswith(".") and event.name not in IGNORE_FILES:
                # A hidden file or directory: rg lists neither, nor anything under it.
                continue
            self._dirty = True
            if event.mask & inotify_flags.ISDIR and event.mask & (inotify_flags.CREATE | inotify_flags.MOVED_TO):
                self._fresh.append(os.path.join(directory, event.name))

    def _watch_tree(self, top: str) -> None:
        pending = [top]
        while pending and not self._unwatchable:
            directory = pending.pop()
            # The watch first, then the listing: a subdirectory created in between is in one or
            # the other.
            if not self._add(directory):
                continue
            try:
                with os.scandir(directory) as entries:
                    pending.extend(
                        entry.path for entry in entries
                        if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
                    )
            except OSError:
                continue  # gone or unreadable: rg lists nothing there either

    def _add(self, directory: str) -> bool:
        if len(self._wds) >= self._max_directories:
            self._give_up(f"more than {self._max_directories:,} directories")
            return False
        if not os.path.isdir(directory):
            return False  # gone since it was listed
        added = _inotify.add(self, directory, directory)
        if isinstance(added, str):
            if os.path.isdir(directory):
                self._give_up(f"{directory} could not be watched ({added})")
            return False
        self._wds.add(added)
        return True

    def _give_up(self, why: str) -> None:
        log.warning("%s is not watched (%s): every semantic_search lists and stats it", self._root, why)
        self._unwatchable = why
        _inotify.forget(self, list(self._wds))
        self._wds = set()


def _outside_ignore_files(root: str) -> list[str]:
    """The files outside the tree's directories that change what rg lists: the ignore files of the
    root's ancestors, the repository's excludes, git's global excludes and config."""
    paths = []
    ancestor = os.path.dirname(os.path.abspath(root))
    while True:
        paths += [os.path.join(ancestor, name) for name in sorted(IGNORE_FILES)]
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    paths += [
        os.path.join(root, ".git", "info", "exclude"),
        os.path.join(config, "git", "ignore"),
        os.path.join(config, "git", "config"),
        os.path.expanduser("~/.gitconfig"),
    ]
    return paths


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _signatures(paths: list[str]) -> list[tuple[int, int, int, int] | None]:
    """A stat of each file, enough to tell it changed (a dozen stats: tens of microseconds)."""
    signatures: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            signatures.append(None)
            continue
        signatures.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return signatures


def _not_local(root: str) -> str:
    """Why changes under `root` might not reach inotify ("" when they all do): its filesystem, or
    one mounted below it (an NFS or FUSE mount inside a local workspace), is not known to be
    local. Mounts made below the root after this check are not seen."""
    mounts = _mounts()
    real = os.path.realpath(root)
    kind = _filesystem_of(real, mounts)
    if kind not in LOCAL_FILESYSTEMS:
        return f"its filesystem is {kind or 'unknown'}, not one known to be local"
    for point, below in mounts:
        if _under(point, real) and point != real and below not in LOCAL_FILESYSTEMS:
            return f"{point} is mounted in it from a filesystem ({below}) not known to be local"
    return ""


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is on ("ext4", "nfs4", ...), from /proc/self/mountinfo;
    "" when it cannot be told."""
    return _filesystem_of(os.path.realpath(path), _mounts())


def _filesystem_of(real: str, mounts: list[tuple[str, str]]) -> str:
    """The type of the innermost of `mounts` holding `real` ("" when none does)."""
    best, kind = "", ""
    for point, point_kind in mounts:
        if _under(real, point) and len(point) >= len(best):
            best, kind = point, point_kind
    return kind


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process sees; [] when it cannot tell."""
    mounts = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields, _, tail = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not tail:
                    continue
                # Mount points escape spaces and the like as octal (\040).
                point = parts[4].encode("latin-1", "backslashreplace").decode("unicode_escape")
                mounts.append((point, tail.split()[0]))
    except OSError:
        return []
    return mounts
