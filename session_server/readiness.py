"""Whether the server should be sent new work: what its gRPC health status reports.

The server is ready (SERVING) unless one of these holds, each a named condition:
- `store`: the store cannot take writes (a probe, off the event loop, checks that its files and
  directory are writable, then on a connection of its own takes SQLite's write lock, writes what
  is there and rolls back; another process holding the lock, a read-only file or directory, a
  missing file all fail it; a server does not start on a file it can only read, see
  `store.Store`);
- `event_log`: storing events failed and has not succeeded since (a full disk fails here);
- `draining`: the server is stopping.

Domain logic, no grpc: the server maps `serving` onto the health service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from session_server.store import check_writable

log = logging.getLogger("codelane.readiness")

CONDITIONS = ("store", "event_log", "draining")
# How often the store probe runs, and how long it waits for the write lock.
DEFAULT_STORE_CHECK_INTERVAL = 5.0
STORE_PROBE_TIMEOUT = 2.0


class Readiness:
    """The conditions that keep the server from taking work; `on_change(serving)` hears each change
    of the overall state."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change
        self._problems: dict[str, str] = {}

    @property
    def serving(self) -> bool:
        return not self._problems

    def conditions(self) -> dict[str, bool]:
        """Each condition (True: fine) and the overall state as "all"."""
        return {"all": self.serving, **{name: name not in self._problems for name in CONDITIONS}}

    def why_not(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self._problems.items())

    def set(self, condition: str, ok: bool, why: str = "") -> None:
        was = self.serving
        if ok:
            if self._problems.pop(condition, None) is not None:
                log.warning("%s is fine again", condition)
        elif condition not in self._problems:
            self._problems[condition] = why
            # A drain is asked for; anything else is trouble.
            log.log(logging.INFO if condition == "draining" else logging.WARNING, "not ready: %s: %s", condition, why)
        if self.serving != was:
            self._on_change(self.serving)


def probe_store(path: Path, timeout: float = STORE_PROBE_TIMEOUT) -> str | None:
    """None when the store at `path` can take writes, else why not. Blocking: run it in a thread."""
    if not path.exists():
        return f"{path} does not exist"
    # Asked of the system, not of SQLite: in a process that has the file open (the server), SQLite
    # reuses the descriptors its closed connections opened read-write, whatever the modes are now.
    # The next start would open the file read-only, and write nothing.
    for needed in (path, path.parent, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if not os.access(needed, os.W_OK) and needed.exists():
            return f"{needed} is read-only to the server: make it writable by the server's user"
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            check_writable(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"{path} cannot take writes: {exc}"
    return None


async def watch_store(path: Path, readiness: Readiness, interval: float) -> None:
    """Probes the store every `interval` seconds, forever; survives its own failures."""
    while True:
        try:
            problem = await asyncio.to_thread(probe_store, path)
            readiness.set("store", problem is None, problem or "")
        except Exception:
            log.exception("probing the store failed; the next probe runs in %gs", interval)
        await asyncio.sleep(interval)
