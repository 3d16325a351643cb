"""How a long-running codelane process (server, worker) learns that a child process ended.

Python 3.11's default child watcher starts a thread per child process; a server spawning ripgrep
for every grep call pays for a thread start and a thread's wake-up each time. A pidfd (Linux 5.3
and later) lets the event loop itself wait for the child, with no thread. Python 3.12 does this
by default; on 3.11 the process entry points install it for the life of their loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def pidfd_child_watcher() -> Iterator[bool]:
    """While the block runs, the running loop watches children through pidfds, where the kernel
    offers them (yields whether it does). The watcher is process-wide and tied to this loop, so
    it is removed on the way out: a later loop in the same process gets the default again."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        yield False
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        yield False  # an older kernel, or pidfds forbidden: keep the thread per child
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(watcher)
    try:
        yield True
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(None)
