"""How a long-running codelane process (server, worker) learns that a child process ended.

Python 3.11's default child watcher starts a thread per child process; a server spawning ripgrep
for every grep call pays for a thread start and a thread's wake-up each time. A pidfd (Linux 5.3
and later) lets the event loop itself wait for the child, with no thread. Python 3.12 does this
by default; on 3.11 the process entry points install it once, on their running loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings


def install_pidfd_child_watcher() -> bool:
    """Makes the running loop watch children through pidfds, where the kernel offers them.
    Returns whether it did. Call once, from a process's main coroutine (the watcher belongs to
    that loop; never from a library or a test that shares the process with other loops)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False  # an older kernel, or pidfds forbidden: keep the thread per child
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(watcher)
    return True
