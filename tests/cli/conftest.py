"""Harness for the CLI and SDK tests: a real server on 127.0.0.1 run in a background thread (so
plain blocking tests can run `codelane` subprocesses against it), and a bounded CLI runner.

Every wait is bounded; servers are stopped and their local worker processes reaped at teardown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from session_server.server import CodelaneServer, ServerConfig
from tests.polling import wait_until

CLI_TIMEOUT = 60.0  # bound on one CLI subprocess
START_TIMEOUT = 30.0  # bound on a server (and its local workers) becoming ready
STOP_TIMEOUT = 20.0


def write_script(path: Path, responses: list[dict[str, Any]]) -> str:
    """Writes a model script (JSON is valid YAML); returns its `scripted:` model string."""
    path.write_text(json.dumps({"responses": responses}, indent=1), encoding="utf-8")
    return f"scripted:{path}"


def call(name: str, call_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "arguments": arguments}
    if call_id is not None:
        entry["id"] = call_id
    return entry


# Two steps: three Query calls (one of them failing), then an edit, a read and the last word.
TWO_STEPS = [
    {"text": "Looking around.", "tool_calls": [
        call("grep", "c_grep", pattern="needle", path="."),
        call("read", "c_read", file_path="src/alpha.py"),
        call("read", "c_missing", file_path="missing.txt"),
    ]},
    {"text": "Editing.", "tool_calls": [
        call("edit", "c_edit", file_path="a.txt", old_string="old", new_string="new"),
        call("read", "c_reread", file_path="a.txt"),
    ]},
    {"text": "Done."},
]  # fmt: skip


class ThreadedServer:
    """A CodelaneServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server = CodelaneServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.port = self._run(self.server.start(), START_TIMEOUT)
        self.address = f"127.0.0.1:{self.port}"

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_workers(self, count: int) -> None:
        wait_until(lambda: len(self.server.pool.workers()) >= count, what=f"{count} local worker(s) to connect",
                   within=START_TIMEOUT)

    def stop(self) -> None:
        try:
            self._run(self.server.stop(grace=0.5), STOP_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(STOP_TIMEOUT)
            if not self._thread.is_alive():
                self.loop.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "alpha.py").write_text("def alpha():\n    return 'needle-alpha'\n", encoding="utf-8")
    (root / "README.md").write_text("# demo\nA needle in a haystack.\n", encoding="utf-8")
    (root / "a.txt").write_text("old content\n", encoding="utf-8")
    return root


@pytest.fixture
def model(tmp_path: Path) -> str:
    """The server's default model: the TWO_STEPS script."""
    return write_script(tmp_path / "two_steps.json", TWO_STEPS)


@pytest.fixture
def make_server(tmp_path: Path, model: str) -> Iterator[Callable[..., ThreadedServer]]:
    """Starts threaded servers on 127.0.0.1:0 (no local workers unless asked)."""
    started: list[ThreadedServer] = []

    def make(**overrides: Any) -> ThreadedServer:
        config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / f"data-{len(started)}", model=model,
                              heartbeat_interval=0.5, heartbeat_timeout=3.0, no_worker_wait=1.0,
                              scripts_dirs=[tmp_path])
        for key, value in overrides.items():
            setattr(config, key, value)
        server = ThreadedServer(config)
        started.append(server)
        if config.local_workers:
            server.wait_workers(config.local_workers)
        return server

    yield make
    errors = []
    for server in reversed(started):
        try:
            server.stop()
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            errors.append(exc)
    assert not errors, errors


@pytest.fixture
def server(make_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    """A fresh server with no workers (Query calls run in the server, on worker `local`)."""
    return make_server()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no inherited codelane settings, config file or API keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODELANE_", "OPENAI_", "ANTHROPIC_"))}
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "CODELANE_CONFIG": os.devnull, **extra})
    return env


def cli(*args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `codelane ARGS...` to completion (stdin closed, output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "codelane.cli", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=env or cli_env(), cwd=cwd,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as one JSON object (fails on any line that is not)."""
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DroppingProxy:
    """A TCP proxy in front of a server, whose `drop()` closes every connection open through it,
    mid-stream, as a network failure would. Connections made afterwards pass as usual, unless
    `refusing` is set: each is then closed at once (a server down), and counted in `refused`."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.dropped = 0  # connections closed by drop()
        self.refusing = False
        self.refused = 0  # connections closed at once while refusing
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="dropping-proxy", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                if self.refusing:
                    client.close()
                    self.refused += 1
                    continue
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                return  # closed
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # dropped, or the other side went away

    def _close(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked reading it
            sock.close()

    def drop(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
            self.dropped += len(sockets) // 2
        self._close(sockets)

    def close(self) -> None:
        self._close([self._listener])
        self.drop()
        self._acceptor.join(10)
