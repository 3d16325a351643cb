"""The process's one inotify instance, shared by every watcher of a tree in it.

Instances are few: `fs.inotify.max_user_instances` (128 by default) counts those of every process
of the user, so one per workspace ran out at about a hundred workspaces (the server's snapshots,
a worker's shared checks and synced trees, semantic_search's indexes), and every tree past that
was stated in full at each rescan. Watches are many (`fs.inotify.max_user_watches`). Events are
sorted to the owners of their directory and wait there until the owner takes them.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

try:
    from inotify_simple import INotify, flags
except ImportError:  # not Linux: callers list and stat their trees instead
    INotify = None  # type: ignore[assignment,misc]
    flags = None  # type: ignore[assignment]

# What changes a directory's listing or a file in it. Every owner asks for the same mask: a
# second inotify_add_watch of a directory replaces the mask of the first.
TREE_MASK = 0 if INotify is None else (
    flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE | flags.CREATE | flags.DELETE | flags.MOVED_FROM
    | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR | flags.DONT_FOLLOW
)
# Events kept for an owner that has not taken them; past this it is told they were lost, so that a
# tree nobody looks at costs no memory.
MAX_PENDING_EVENTS = 10_000

Event = Any  # inotify_simple.Event: wd, mask, cookie, name


class SharedInotify:
    """Thread-safe. Lock order: an owner's own lock, then this one's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inotify: INotify | None = None
        self._problem = "" if INotify is not None else "inotify is not available on this platform"
        # wd -> each owner and the name it knows the directory by. Two trees, one inside the
        # other, share the watches of the inner one's directories.
        self._owners: dict[int, dict[object, Any]] = {}
        self._pending: dict[object, list[tuple[Event, Any]]] = {}
        self._overflowed: set[object] = set()

    def problem(self) -> str:
        """Why nothing can be watched in this process ("" when watching can work)."""
        with self._lock:
            return self._instance_problem()

    def add(self, owner: object, path: str | bytes, name: Any) -> int | str:
        """Watches the directory `path` for `owner`, who will get its events with `name`: the
        watch descriptor, or why it could not be watched. A directory watched already keeps its
        descriptor, now known to `owner` by `name`."""
        with self._lock:
            problem = self._instance_problem()
            if problem:
                return problem
            assert self._inotify is not None
            try:
                wd = self._inotify.add_watch(path, TREE_MASK)
            except OSError as exc:
                hint = "; raise fs.inotify.max_user_watches" if exc.errno == errno.ENOSPC else ""
                return f"{exc.strerror or exc}{hint}"
            self._owners.setdefault(wd, {})[owner] = name
            return wd

    def forget(self, owner: object, wds: list[int]) -> None:
        """Drops `owner`'s watches (the kernel's go when no other owner has them) and its events."""
        with self._lock:
            for wd in wds:
                owners = self._owners.get(wd)
                if owners is None or owners.pop(owner, None) is None or owners:
                    continue
                del self._owners[wd]
                if self._inotify is not None:
                    try:
                        self._inotify.rm_watch(wd)
                    except OSError:
                        pass  # its directory is gone already
            self._pending.pop(owner, None)
            self._overflowed.discard(owner)

    def take(self, owner: object) -> tuple[list[tuple[Event, Any]], bool]:
        """`owner`'s events since the last call, each with its directory's name as `owner` gave
        it, and whether events were lost meanwhile (the queue overflowed, or too many waited)."""
        with self._lock:
            if self._inotify is not None:
                for event in self._inotify.read(timeout=0):
                    if event.mask & flags.Q_OVERFLOW:
                        self._overflowed.update(self._pending)
                        self._overflowed.update(o for owners in self._owners.values() for o in owners)
                        continue
                    owners = self._owners.get(event.wd)
                    if not owners:
                        continue
                    for watcher, name in owners.items():
                        waiting = self._pending.setdefault(watcher, [])
                        if len(waiting) < MAX_PENDING_EVENTS:
                            waiting.append((event, name))
                        else:
                            self._overflowed.add(watcher)
                    if event.mask & flags.IGNORED:
                        del self._owners[event.wd]  # the kernel dropped the watch with its directory
            overflowed = owner in self._overflowed
            self._overflowed.discard(owner)
            return self._pending.pop(owner, []), overflowed

    def _instance_problem(self) -> str:
        # Caller holds the lock. A failure is remembered: the instances of the user are taken by
        # other processes, and retrying at every directory would cost a failed syscall each.
        if self._inotify is None and not self._problem:
            try:
                self._inotify = INotify(nonblocking=True)
            except OSError as exc:
                self._problem = f"no inotify instance ({exc.strerror or exc}; raise fs.inotify.max_user_instances)"
        return self._problem


shared_inotify = SharedInotify()
