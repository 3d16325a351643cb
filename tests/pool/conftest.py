"""Real processes on loopback: an in-test session server (hub + admin) and tool-worker processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import pytest

from session_server.server import CodelaneServer, ServerConfig

PLUGIN = "benchmarks.plugin_tools"


class WorkerProcs:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Each worker's cache (synced workspaces) lives here, never in the user's home.
        self.cache_root = tempfile.mkdtemp(prefix="codelane-worker-cache-")

    def spawn(
        self,
        port: int,
        worker_id: str,
        *,
        slots: int = 2,
        labels: str = "",
        token: str | None = None,
        roots: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "tool_worker",
            "--connect",
            f"{host}:{port}",
            "--id",
            worker_id,
            "--slots",
            str(slots),
            "--tools",
            PLUGIN,
            "--cache-dir",
            os.path.join(self.cache_root, worker_id.replace("/", "_")),
        ]
        if labels:
            argv += ["--labels", labels]
        if token:
            argv += ["--token", token]
        for root in roots:
            argv += ["--root", root]
        argv += list(extra)
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
        self.procs[worker_id] = proc
        return proc

    def kill9(self, worker_id: str) -> None:
        self.procs[worker_id].send_signal(signal.SIGKILL)
        self.procs[worker_id].wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        shutil.rmtree(self.cache_root, ignore_errors=True)


@pytest.fixture
def workers() -> WorkerProcs:
    procs = WorkerProcs()
    yield procs
    procs.stop_all()


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., object]]:
    servers: list[CodelaneServer] = []

    async def make(**overrides) -> CodelaneServer:
        config = ServerConfig(
            listen="127.0.0.1:0", local_workers=0, heartbeat_interval=0.5, heartbeat_timeout=3.0, no_worker_wait=1.0
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        server = CodelaneServer(config)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop(grace=0.5)


async def wait_for(predicate: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; only its parent can reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
