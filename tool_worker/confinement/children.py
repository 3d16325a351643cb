"""Child processes for asyncio code, without asyncio's thread per child."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from typing import Any


def start_child(argv: Sequence[str], **popen_options: Any) -> subprocess.Popen[bytes]:
    """Starts a child from the event loop's thread. Popen only forks and execs here, as asyncio's
    own subprocess support does in that same thread; waiting is `wait_child`'s. A sandbox's
    --die-with-parent (PR_SET_PDEATHSIG) watches the thread that forked it: the loop's, which
    lives as long as the server."""
    return subprocess.Popen(argv, **popen_options)


async def wait_child(popen: subprocess.Popen[bytes]) -> int:
    """Waits until `popen` exits and reaps it. A pidfd becomes readable when its process ends, so
    the event loop itself notices; asyncio's own child watcher starts a thread per child, which
    costs a call more than the wait itself on a busy machine."""
    if popen.returncode is None:
        await fd_readable(os.pidfd_open(popen.pid), close=True)
        popen.wait()
    return popen.returncode


async def fd_readable(fd: int, *, close: bool = False) -> None:
    """Waits until `fd` is readable (for a pidfd: until its process has ended)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
        if close:
            os.close(fd)
