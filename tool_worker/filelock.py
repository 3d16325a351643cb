"""Exclusive locks on files, for directories one process at a time may use (a server's data
directory, a worker's cache slot). `flock`: the kernel drops the lock when its process dies, so
a crash never leaves a directory locked."""

from __future__ import annotations

import fcntl
import os


def try_lock(path: str) -> int | None:
    """Opens (creating) `path` and locks it for this process: the descriptor, to keep open while
    the lock is wanted, or None when another holds it. Raises OSError when it cannot be opened."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor
