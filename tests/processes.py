"""Finding a test's processes on the host by a marker in their command line.

A sandboxed command lives in a PID namespace of its own, so the pids it prints mean nothing on
the host: tests start `sleep MARKER` (a marker is a valid, unique number of seconds) and look for
that argument in /proc/*/cmdline instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid


def marker() -> str:
    """A unique `sleep` argument of about 11 days: never ends during a test on its own."""
    return f"999999.{uuid.uuid4().int % 10**12:012d}"


def pids_with(argument: str) -> list[int]:
    """Live (not zombie) processes with `argument` among their command-line arguments."""
    found = []
    wanted = argument.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if wanted in args and state != b"Z":
            found.append(int(entry.name))
    return found


def command_names(argument: str) -> list[str]:
    """The program names (/proc/PID/comm) of the processes carrying `argument`."""
    names = []
    for pid in pids_with(argument):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
    return names


async def all_gone(argument: str, within: float = 10.0) -> bool:
    """True once no process carries `argument`: waits on each one's pidfd, not on a clock."""
    loop = asyncio.get_running_loop()
    for pid in pids_with(argument):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        ended = loop.create_future()
        loop.add_reader(pidfd, lambda ended=ended: ended.done() or ended.set_result(None))
        try:
            await asyncio.wait_for(ended, within)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    return not pids_with(argument)


def kill_all(argument: str) -> None:
    """Teardown: no test leaves its marked processes behind, whatever it asserted."""
    for pid in pids_with(argument):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
