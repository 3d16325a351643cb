"""Processes of Query tools (ripgrep): read-only, without network, wherever they run.

Landlock confines a thread and the processes it starts, for good. So these processes are started
from dedicated threads that restrict themselves once, when they start: the filesystem may be read
and executed but not changed, TCP may neither connect nor bind (Landlock ABI 4+), and abstract
unix sockets and signals do not reach outside the domain (ABI 6+). Starting a process there costs
a hand-over to the thread, not a new sandbox per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import landlockpy
from landlockpy import AccessFS, Ruleset, fs_for_abi, net_for_abi, scope_for_abi

from tool_worker.confinement.children import wait_child

log = logging.getLogger("codelane.sandbox")

_THREADS = 2
_READ = AccessFS.READ_FILE | AccessFS.READ_DIR | AccessFS.EXECUTE
# Popen opens /dev/null read-write for a child's stdin.
_DEV_NULL = AccessFS.READ_FILE | AccessFS.WRITE_FILE | AccessFS.IOCTL_DEV
_READ_CHUNK = 256 * 1024


class ConfinementUnavailable(Exception):
    """The host cannot confine Query tools' processes; the message says why and what to do."""


def landlock_problem(abi: int) -> str:
    """Why Query tools cannot be confined with this ABI; "" when they can."""
    if abi >= 1:
        return ""
    return (
        "Landlock is not available (it needs Linux 5.13 or later with landlock in the kernel's lsm= list), "
        "so ripgrep cannot run read-only; enable Landlock, or start with --allow-unsandboxed to run it unconfined"
    )


def describe_landlock(abi: int) -> str:
    """What Query tools' processes are held to with this ABI (for start-up logs and docs)."""
    if abi < 1:
        return "unconfined (no Landlock)"
    parts = ["read-only filesystem"]
    parts.append("no TCP" if abi >= 4 else "network NOT restricted (needs Landlock ABI 4, Linux 6.7)")
    if abi >= 6:
        parts.append("no signals or abstract sockets outside")
    return f"Landlock ABI {abi}: " + ", ".join(parts)


class ReadOnlyProcess:
    """A started process with asyncio readers of its stdout and stderr (like asyncio's Process)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader, transports: list[asyncio.BaseTransport]) -> None:
        self._popen = popen
        self.stdout = stdout
        self.stderr = stderr
        self._transports = transports

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def kill(self) -> None:
        if self._popen.returncode is None:
            self._popen.kill()

    async def wait(self) -> int:
        returncode = await wait_child(self._popen)
        for transport in self._transports:
            transport.close()
        return returncode


class ReadOnlyLauncher:
    """Starts processes read-only and without network (see the module docstring)."""

    def __init__(self, allow_unconfined: bool = False) -> None:
        self.abi = landlockpy.abi_version()
        self.problem = landlock_problem(self.abi)
        self.allow_unconfined = allow_unconfined
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._confined = threading.local()

    def describe(self) -> str:
        if self.problem and self.allow_unconfined:
            return "unconfined (no Landlock; --allow-unsandboxed)"
        return describe_landlock(self.abi)

    async def exec(self, *argv: str, cwd: Path) -> ReadOnlyProcess:
        """Starts argv in cwd with stdin /dev/null; raises ConfinementUnavailable (nothing runs)
        when the host cannot confine it, and OSError when it cannot start."""
        if self.problem and not self.allow_unconfined:
            raise ConfinementUnavailable(self.problem)
        loop = asyncio.get_running_loop()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            popen = await loop.run_in_executor(self._threads(), self._start, argv, cwd, out_write, err_write)
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        streams, transports = [], []
        for fd in (out_read, err_read):
            stream = asyncio.StreamReader(limit=_READ_CHUNK)
            transport, _ = await loop.connect_read_pipe(
                lambda stream=stream: asyncio.StreamReaderProtocol(stream), os.fdopen(fd, "rb", buffering=0)
            )
            streams.append(stream)
            transports.append(transport)
        return ReadOnlyProcess(popen, streams[0], streams[1], transports)

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    _THREADS, thread_name_prefix="codelane-readonly", initializer=self._confine_thread
                )
            return self._executor

    def _confine_thread(self) -> None:
        # Runs first in each thread of the pool. A failure is remembered, not raised: raising
        # would break the pool, and every later call must fail with the reason instead.
        self._confined.problem = self.problem
        if self.problem:
            return
        try:
            with Ruleset(handled_fs=fs_for_abi(self.abi), handled_net=net_for_abi(self.abi),
                         scoped=scope_for_abi(self.abi)) as ruleset:
                ruleset.allow_path("/", _READ)
                ruleset.allow_path(os.devnull, _DEV_NULL)
                ruleset.restrict()
        except OSError as exc:
            self._confined.problem = f"Landlock refused to confine the thread that starts ripgrep: {exc}"
            # Said when it happens: the start-up line named Landlock (this host has it), and with
            # --allow-unsandboxed ripgrep then ran unconfined without a word.
            outcome = ("ripgrep runs unconfined from it (--allow-unsandboxed)" if self.allow_unconfined
                       else "the Query tools that start ripgrep fail from it (SANDBOX_UNAVAILABLE)")
            log.warning("%s; %s", self._confined.problem, outcome)

    def _start(self, argv: Sequence[str], cwd: Path, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
        problem = self._confined.problem
        if problem and not self.allow_unconfined:
            raise ConfinementUnavailable(problem)
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
