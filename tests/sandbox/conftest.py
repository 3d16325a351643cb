"""The sandbox suite's harness: real `codelane server` processes, confined or started with
`--sandbox off --allow-unsandboxed`, driven by scripted models whose bash calls try to escape."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from tests.session.conftest import Client, Processes, ServerProcess, call, kind, make_server, scripted, workspace  # noqa: F401 (fixtures of this directory too)

# Given to every server here; a confined command must never see it.
FAKE_OPENAI_KEY = f"sk-codelane-fake-{uuid.uuid4().hex}"
TURN_TIMEOUT = 60.0


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        await procs.close()


@dataclass
class Host:
    """One server and the host paths its commands will try to reach."""

    server: ServerProcess
    data_dir: Path
    workspace: Path
    # A directory outside the workspace and outside /tmp (which sandboxes replace with their own).
    outside: Path
    # A file inside the workspace on the server's deny list (--sandbox-deny-read), and its content.
    secret: Path
    secret_text: str

    @property
    def client(self) -> Client:
        assert self.server.client is not None
        return self.server.client

    async def run(self, tmp_path: Path, calls: list[dict[str, Any]], **config: Any) -> dict[str, tools_pb2.ToolResult]:
        """One turn of these calls in a new session; each call's result by call id."""
        name = f"script-{uuid.uuid4().hex[:8]}.yaml"
        model = scripted(tmp_path, [{"text": "Trying.", "tool_calls": calls}, {"text": "Done."}], name=name)
        session = await self.client.create(self.workspace, model, **config)
        events = await self.client.send(session.session_id, "go", within=TURN_TIMEOUT)
        assert kind(events[-1]) == "turn_finished", events[-1]
        assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN, events[-1]
        return {
            e.tool_call_finished.call_id: e.tool_call_finished.result
            for e in events
            if kind(e) == "tool_call_finished"
        }


@pytest.fixture
def start_host(processes: Processes, tmp_path: Path) -> Any:
    """start_host(off=False, args=()) -> Host: a server with no local workers (bash runs on it)."""
    created: list[Path] = []

    async def start(*, off: bool = False, args: tuple[str, ...] = ()) -> Host:
        n = len(created)
        ws = tmp_path / f"ws-{n}"
        (ws / ".git" / "hooks").mkdir(parents=True)
        (ws / ".git" / "config").write_text("[core]\n")
        (ws / "README.md").write_text("# workspace\n")
        # Outside /tmp, which sandboxes replace with their own: there only a deny rule hides it.
        host_dir = Path.home() / ".cache" / "codelane-sandbox-tests" / uuid.uuid4().hex
        outside = host_dir / "outside"
        outside.mkdir(parents=True)
        created.append(host_dir)
        secret_text = f"top-secret-{uuid.uuid4().hex}"
        secret = ws / "credentials.txt"
        secret.write_text(secret_text)
        flags = ["--sandbox-deny-read", str(secret), *args]
        if off:
            flags += ["--sandbox", "off", "--allow-unsandboxed"]
        data_dir = host_dir / "data"
        server = await processes.start_server(
            data_dir, local_workers=0, env={"OPENAI_API_KEY": FAKE_OPENAI_KEY}, args=tuple(flags)
        )
        return Host(server, data_dir, ws, outside, secret, secret_text)

    yield start
    for path in created:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    port: int
    accepted: int = 0


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    state = Listener(0)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.accepted += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def bash(call_id: str, command: str, timeout_ms: int | None = None) -> dict[str, Any]:
    arguments: dict[str, Any] = {"command": command}
    if timeout_ms is not None:
        arguments["timeout"] = timeout_ms
    return call("bash", call_id, **arguments)


def sandbox_config(**limits: Any) -> dict[str, Any]:
    """CreateSession config with these SandboxLimits."""
    return {"sandbox": session_pb2.SandboxPolicy(limits=session_pb2.SandboxLimits(**limits))}
