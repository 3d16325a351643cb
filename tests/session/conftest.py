"""End-to-end harness for SessionService: real servers (in-process or subprocess), real channels.

Everything listens on 127.0.0.1 only, every wait is bounded, and every process started here is
killed at teardown (subprocess servers run in their own process group, with their local workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from codelane.transport import CHANNEL_OPTIONS
from codelane.v1 import admin_pb2, admin_pb2_grpc, events_pb2, session_pb2, session_pb2_grpc
from session_server.llm.script import Script
from session_server.mock_llm.server import MOCK_LLM_KEY, MockLLM, start_mock_llm
from session_server.server import CodelaneServer, ServerConfig
from tests.polling import poll_until

RPC_TIMEOUT = 10.0  # deadline of every unary RPC
STREAM_TIMEOUT = 20.0  # bound on reading one whole stream
START_TIMEOUT = 20.0  # bound on a subprocess server (and its workers) becoming ready


# -- scripts -----------------------------------------------------------------------------------


def write_script(directory: Path, responses: list[dict[str, Any]], name: str = "script.yaml") -> Path:
    """Writes a model script (JSON is valid YAML) and returns its path."""
    path = directory / name
    path.write_text(json.dumps({"responses": responses}, indent=1), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def mock_llm(monkeypatch: pytest.MonkeyPatch, script: Script | str | Path,
                   **options: Any) -> AsyncIterator[MockLLM]:
    """The project's mock LLM over HTTP, serving `script` (MockOptions in `options`), with both
    providers' base URL and key pointed at it: sessions of `openai:mock` or `anthropic:mock` use it."""
    runner, url = await start_mock_llm(script, **options)
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        yield runner.app[MOCK_LLM_KEY]
    finally:
        await runner.cleanup()


def scripted(directory: Path, responses: list[dict[str, Any]], name: str = "script.yaml") -> str:
    """A `scripted:` model string for these responses."""
    return f"scripted:{write_script(directory, responses, name)}"


def call(name: str, call_id: str | None = None, **arguments: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "arguments": arguments}
    if call_id is not None:
        entry["id"] = call_id
    return entry


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetails:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]


def error_details(exc: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status of a failed call, with its ErrorInfo unpacked."""
    status = rpc_status.from_call(exc)
    assert status is not None, f"{exc.code()} {exc.details()!r} carries no google.rpc.Status"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo in {status}"
    return ErrorDetails(exc.code(), status.message, infos[0].reason, infos[0].domain, dict(infos[0].metadata))


async def rpc_error(awaitable: Awaitable[Any]) -> ErrorDetails:
    """Awaits a call that must fail; returns its error details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(awaitable, STREAM_TIMEOUT)
    return error_details(caught.value)


# -- streams -----------------------------------------------------------------------------------


def kind(event: events_pb2.Event) -> str:
    return event.WhichOneof("kind")


async def drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def collect(stream: Any, within: float = STREAM_TIMEOUT) -> list[Any]:
    """Every message of a server stream, bounded in time (the call is cancelled on timeout)."""
    try:
        return await asyncio.wait_for(drain(stream), within)
    except TimeoutError:
        stream.cancel()
        raise


async def read_until(
    stream: Any, predicate: Callable[[Any], bool], into: list[Any], within: float = STREAM_TIMEOUT
) -> Any:
    """Reads messages into `into` until one satisfies `predicate`; returns it."""

    async def loop() -> Any:
        while True:
            item = await stream.read()
            if item is grpc.aio.EOF:
                raise AssertionError(f"stream ended before the expected message; got {len(into)} messages")
            into.append(item)
            if predicate(item):
                return item

    return await asyncio.wait_for(loop(), within)


async def read_rest(stream: Any, within: float = STREAM_TIMEOUT) -> list[Any]:
    """The remaining messages of a stream already read with `read()` (iteration may not be mixed in)."""

    async def loop() -> list[Any]:
        items = []
        while (item := await stream.read()) is not grpc.aio.EOF:
            items.append(item)
        return items

    try:
        return await asyncio.wait_for(loop(), within)
    except TimeoutError:
        stream.cancel()
        raise


def events_of(responses: list[Any]) -> list[events_pb2.Event]:
    return [r.event for r in responses if r.HasField("event")]


@dataclass(frozen=True)
class StreamItem:
    """One event (or a caught_up marker) of a SendMessage or WatchEvents stream: the server sends
    events in batches, and these tests reason about them one at a time."""

    event: events_pb2.Event | None = None
    caught_up: session_pb2.CaughtUp | None = None

    def HasField(self, name: str) -> bool:
        return getattr(self, name) is not None


class EventStream:
    """A streaming call read one StreamItem at a time, with the call's `read()`/`cancel()`."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._pending: deque[StreamItem] = deque()
        self.messages = 0

    async def read(self) -> Any:
        while not self._pending:
            reply = await self.call.read()
            if reply is grpc.aio.EOF:
                return grpc.aio.EOF
            self.messages += 1
            if isinstance(reply, session_pb2.SendMessageResponse):
                events = reply.events
            elif reply.HasField("caught_up"):
                self._pending.append(StreamItem(caught_up=reply.caught_up))
                continue
            else:
                events = reply.events.events
            assert events, "a stream message carries at least one event"
            self._pending.extend(StreamItem(event=e) for e in events)
        return self._pending.popleft()

    def cancel(self) -> bool:
        return self.call.cancel()

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[StreamItem]:
        while (item := await self.read()) is not grpc.aio.EOF:
            yield item


def assert_gap_free(events: list[events_pb2.Event], start: int = 1) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == list(range(start, start + len(events))), sequences


# -- clients -----------------------------------------------------------------------------------


class Client:
    """SessionService and AdminService stubs on one real channel, with bounded helpers."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def create(self, workspace: Path | str, model: str = "", **config: Any) -> session_pb2.Session:
        request = session_pb2.CreateSessionRequest(
            workspace=str(workspace), config=session_pb2.SessionConfig(model=model, **config)
        )
        return (await self.sessions.CreateSession(request, timeout=RPC_TIMEOUT)).session

    async def get(self, session_id: str) -> session_pb2.Session:
        request = session_pb2.GetSessionRequest(session_id=session_id)
        return (await self.sessions.GetSession(request, timeout=RPC_TIMEOUT)).session

    async def count_sessions(self) -> int:
        response = await self.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_size=1000), timeout=RPC_TIMEOUT
        )
        return len(response.sessions)

    def send_stream(self, session_id: str, text: str) -> EventStream:
        return EventStream(self.sessions.SendMessage(session_pb2.SendMessageRequest(session_id=session_id, text=text)))

    async def send(self, session_id: str, text: str, within: float = STREAM_TIMEOUT) -> list[events_pb2.Event]:
        """Runs one turn; returns its events (the stream ends after TurnFinished)."""
        return [r.event for r in await collect(self.send_stream(session_id, text), within)]

    def watch_stream(self, session_id: str, after: int = 0, follow: bool = False) -> EventStream:
        request = session_pb2.WatchEventsRequest(session_id=session_id, after_sequence=after, follow=follow)
        return EventStream(self.sessions.WatchEvents(request))

    async def watch(self, session_id: str, after: int = 0) -> tuple[list[events_pb2.Event], int]:
        """Replay (follow=False): the events and the caught_up marker's last_sequence."""
        items = await collect(self.watch_stream(session_id, after, follow=False))
        assert items and items[-1].HasField("caught_up"), "a replay ends with caught_up"
        assert all(i.HasField("event") for i in items[:-1])
        return events_of(items[:-1]), items[-1].caught_up.last_sequence

    async def messages(
        self, session_id: str, page_size: int = 0, page_token: str = ""
    ) -> session_pb2.GetMessagesResponse:
        request = session_pb2.GetMessagesRequest(session_id=session_id, page_size=page_size, page_token=page_token)
        return await self.sessions.GetMessages(request, timeout=RPC_TIMEOUT)

    async def history(self, session_id: str) -> list[session_pb2.Message]:
        return list((await self.messages(session_id, page_size=1000)).messages)

    async def cancel(self, session_id: str) -> bool:
        request = session_pb2.CancelTurnRequest(session_id=session_id, reason="test")
        return (await self.sessions.CancelTurn(request, timeout=RPC_TIMEOUT)).cancelled

    async def wait_idle(self, session_id: str, within: float = 10.0) -> session_pb2.Session:
        async def idle() -> session_pb2.Session | None:
            session = await self.get(session_id)
            return session if session.state == session_pb2.SESSION_STATE_IDLE else None

        return await poll_until(idle, within=within, what=f"session {session_id} to be idle")

    async def worker_ids(self) -> set[str]:
        response = await self.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT)
        return {w.worker_id for w in response.workers}

    async def wait_workers(self, *worker_ids: str, within: float = START_TIMEOUT) -> None:
        async def connected() -> bool:
            return set(worker_ids) <= await self.worker_ids()

        await poll_until(connected, within=within, what=f"workers {worker_ids} to connect")


# -- in-process servers ------------------------------------------------------------------------


@dataclass
class InProcess:
    server: CodelaneServer
    client: Client


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[InProcess]]]:
    """Starts CodelaneServer instances on 127.0.0.1:0 (no local workers unless asked)."""
    started: list[InProcess] = []

    async def make(**overrides: Any) -> InProcess:
        config = ServerConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / f"data-{len(started)}",
            local_workers=0,
            heartbeat_interval=0.5,
            heartbeat_timeout=3.0,
            no_worker_wait=1.0,
            # Tests write the scripts their sessions name here.
            scripts_dirs=[tmp_path],
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        server = CodelaneServer(config)
        port = await server.start()
        entry = InProcess(server, Client(f"127.0.0.1:{port}"))
        started.append(entry)
        return entry

    yield make
    for entry in reversed(started):
        await entry.client.close()
        await asyncio.wait_for(entry.server.stop(grace=0.5), 15.0)


@pytest.fixture
async def client(make_server: Callable[..., Awaitable[InProcess]]) -> Client:
    """A client of a fresh in-process server with default settings."""
    return (await make_server()).client


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace with a few files to grep and read."""
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "alpha.py").write_text("def alpha():\n    return 'needle-alpha'\n", encoding="utf-8")
    (root / "src" / "beta.py").write_text("def beta():\n    return 'needle-beta'\n", encoding="utf-8")
    (root / "README.md").write_text("# demo\nA needle in a haystack.\n", encoding="utf-8")
    (root / "a.txt").write_text("old content\n", encoding="utf-8")
    return root


# -- subprocess servers ------------------------------------------------------------------------


def free_port() -> int:
    """A port free now, for a listener that cannot say which port it bound (another process may
    take it before that listener binds it: a server is started on port 0 instead, see
    `listening_port`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LISTENING = re.compile(r"^codelane server listening on 127\.0\.0\.1:(\d+)$", re.MULTILINE)


def listening_port(out: str) -> int | None:
    """The port a server started with `--listen 127.0.0.1:0` says it bound, from its stdout; None
    before it says so."""
    found = _LISTENING.search(out)
    return int(found.group(1)) if found else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path
    client: Client | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.err.read_text(errors="replace")[-4000:] if self.err.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the server process only (its workers are orphaned, as after a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _spawn(argv: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as stdout, err.open("wb") as stderr:
        # Own process group: the local workers join it, so teardown kills them all.
        return subprocess.Popen(
            argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


@dataclass
class Processes:
    """Subprocess servers and stray process groups to kill at teardown."""

    tmp_path: Path
    servers: list[ServerProcess] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)

    async def start_server(
        self,
        data_dir: Path,
        *,
        model: str = "",
        env: dict[str, str] | None = None,
        local_workers: int = 2,
        args: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),
    ) -> ServerProcess:
        """`args`: more `codelane server` flags; `wrapper`: a command that runs the server (e.g.
        setpriv, to take capabilities from it)."""
        n = len(self.servers)
        out, err = self.tmp_path / f"server-{n}.out", self.tmp_path / f"server-{n}.err"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CODELANE_"))}
        child_env.update(env or {})
        child_env["PYTHONUNBUFFERED"] = "1"
        argv = [
            *wrapper, sys.executable, "-m", "codelane.cli", "server",
            "--listen", "127.0.0.1:0",  # the server takes a free port itself: no race for one
            "--data-dir", str(data_dir),
            "--local-workers", str(local_workers),
            "--model", model,
            "--scripts-dir", str(self.tmp_path),
            "--log-level", "WARNING",
            *args,
        ]  # fmt: skip
        proc = _spawn(argv, child_env, out, err)
        self.groups.append(proc.pid)

        def listening() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{err.read_text(errors='replace')}")
            return listening_port(out.read_text(errors="replace"))

        try:
            port = await poll_until(listening, within=START_TIMEOUT, what="the server to listen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{err.read_text(errors='replace')[-4000:]}") from None
        server = ServerProcess(proc, port, out, err)
        self.servers.append(server)
        server.client = Client(f"127.0.0.1:{port}")
        return server

    def kill_pid_file(self, path: Path) -> None:
        """Kills the process group whose leader's pid a tool call wrote to `path`."""
        if path.exists() and path.read_text().strip():
            kill_group(int(path.read_text().strip()))

    async def close(self) -> None:
        for server in self.servers:
            if server.client is not None:
                await server.client.close()
        for pgid in self.groups:
            kill_group(pgid)
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(10)


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        await procs.close()

