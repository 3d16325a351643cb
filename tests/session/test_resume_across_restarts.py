"""Followers that must see every event of a session exactly once, in order, while the server is
stopped (SIGTERM) or killed (SIGKILL) mid-turn and restarted on the same data dir and port: raw
WatchEvents streams resumed with after_sequence, the Python SDK's own resume and the Node
client's (tests/session/node/followers.mjs; skipped without clients/node's `npm install`). Each
run cuts a turn on several sessions, each followed by several clients: the cut turn ends
INTERRUPTED, the next runs, and every follower holds exactly the stored log.

Each test runs real `codelane server` processes on a loopback port (see `Processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import codelane
from codelane.events import CaughtUp
from codelane.v1 import events_pb2, session_pb2, session_pb2_grpc
from tests.session.conftest import Processes, call, free_port, kind, scripted

SESSIONS = 5
FOLLOWERS_PER_SESSION = 10
STEPS = 6


def _model(tmp_path: Path, read: str = "a.txt") -> str:
    step = {"text": "Looking.", "tool_calls": [
        call("read" if i % 2 else "grep", **({"file_path": read} if i % 2 else {"pattern": "needle"}))
        for i in range(10)
    ]}
    waiting = {"text": "Waiting.", "tool_calls": [call("bash", command="sleep 1000")]}
    # Turn 1: fast steps, then a command that outlasts the test (cut by the stop); turn 2 ends.
    return scripted(tmp_path, [*[step] * STEPS, waiting, step, {"text": "Done."}])


def _copy(workspace: Path, to: Path) -> Path:
    shutil.copytree(workspace, to)
    return to


class Follower:
    """A raw WatchEvents follower that resumes after the last sequence it received, on whichever
    server is up (each restart sets `up` again)."""

    def __init__(self, session_id: str, servers: Servers) -> None:
        self.session_id = session_id
        self.servers = servers
        self.events: list[events_pb2.Event] = []
        self.caught_ups: list[int] = []
        self.errors: list[tuple[Any, str]] = []
        self._progress = asyncio.Event()
        self.watching = asyncio.Event()  # set at its first caught_up
        self.failure: BaseException | None = None

    async def reach(self, sequence: int) -> None:
        """Returns once an event of `sequence` or later was received."""
        while not self.events or self.events[-1].sequence < sequence:
            if self.failure is not None:
                raise AssertionError(f"the follower failed after {len(self.events)} events") from self.failure
            self._progress.clear()
            await self._progress.wait()

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException as exc:
            self.failure = exc
            self._progress.set()
            raise

    async def _run(self) -> None:
        while True:
            generation = self.servers.generation
            await self.servers.up.wait()
            after = self.events[-1].sequence if self.events else 0
            stream = self.servers.stub.WatchEvents(
                session_pb2.WatchEventsRequest(session_id=self.session_id, after_sequence=after, follow=True),
                wait_for_ready=True)
            try:
                async for reply in stream:
                    if reply.HasField("caught_up"):
                        self.caught_ups.append(reply.caught_up.last_sequence)
                        self.watching.set()
                        continue
                    self.events.extend(reply.events.events)
                    self._progress.set()
            except grpc.aio.AioRpcError as exc:
                # SHUTTING_DOWN from a stopping server, or the connection lost to a killed one.
                self.errors.append((exc.code(), exc.details()))
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
                # Waits for the next server (each stop sets `changed`, each start `up`): resumed
                # on it. A resume that failed while a server is up (the channel had not yet
                # reconnected) goes again at once: it waits for the connection (wait_for_ready).
                while self.servers.generation == generation and not self.servers.up.is_set():
                    await self.servers.changed.wait()
                continue
            raise AssertionError("a following stream ended without an error")


class SdkFollower:
    """A follower through the Python SDK's `Session.watch`, which resumes on its own. All share one
    client (one channel), as the followers of one process do: each resumes at once after its
    stream's SHUTTING_DOWN, and some of those resumes reach the server while it stops."""

    def __init__(self, session_id: str, servers: Servers) -> None:
        self.session_id = session_id
        self.servers = servers
        self.events: list[Any] = []
        self.caught_ups: list[int] = []
        self.errors: list[Any] = []
        self._progress = asyncio.Event()
        self.watching = asyncio.Event()  # set at its first caught_up
        self.failure: BaseException | None = None

    reach = Follower.reach
    run = Follower.run

    async def _run(self) -> None:
        session = await self.servers.sdk.get_session(self.session_id)
        async for item in session.watch(0, follow=True):
            if isinstance(item, CaughtUp):
                self.caught_ups.append(item.last_sequence)
                self.watching.set()
                continue
            self.events.append(item)
            self._progress.set()


class Servers:
    """The server that is up now (one port, reused at each restart)."""

    def __init__(self, processes: Processes, data_dir: Path, model: str) -> None:
        self.processes = processes
        self.data_dir = data_dir
        self.model = model
        self.port = free_port()
        self.up = asyncio.Event()
        self.changed = asyncio.Event()
        self.generation = 0
        self.server: Any = None
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.sdk = codelane.Client(f"127.0.0.1:{self.port}")
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)

    async def start(self) -> Any:
        self.server = await self.processes.start_server(
            self.data_dir, model=self.model, local_workers=0,
            args=("--listen", f"127.0.0.1:{self.port}", "--shutdown-grace", "0.5"))
        self.up.set()
        return self.server

    def _down(self) -> None:
        self.up.clear()
        self.generation += 1
        self.changed.set()
        self.changed = asyncio.Event()

    def stop(self, how: signal.Signals) -> None:
        self._down()
        self.server.proc.send_signal(how)
        self.server.proc.wait(20)


async def _sessions(servers: Servers, workspace: Path, tmp_path: Path) -> list[str]:
    # A workspace each: a session's long command holds its workspace, and would hold another's reads.
    return [(await servers.server.client.create(_copy(workspace, tmp_path / f"ws{i}"))).session_id
            for i in range(SESSIONS)]


async def _cut_and_restart(servers: Servers, sessions: list[str], how: signal.Signals) -> dict[str, int]:
    """Runs a turn on each session, stops the server with `how` while every turn waits on its long
    command, restarts it, runs a second turn on each; returns each session's last sequence."""
    client = servers.server.client
    turns = [client.send_stream(sid, "go") for sid in sessions]
    for turn in turns:
        responses = 0
        # Up to the response that asks for the long command (with no worker, it waits for one).
        while responses < STEPS + 1:
            item = await asyncio.wait_for(turn.read(), 20)
            assert item is not grpc.aio.EOF and kind(item.event) != "turn_finished"
            responses += kind(item.event) == "model_responded"
    servers.stop(how)
    for turn in turns:
        turn.cancel()
    client = (await servers.start()).client
    ends = {}
    for sid in sessions:
        events = await client.send(sid, "again")
        assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
        ends[sid] = events[-1].sequence
    return ends


async def _stored(servers: Servers, sid: str) -> list[events_pb2.Event]:
    """The session's log, checked: gap-free, the cut turn INTERRUPTED and the next ended, each turn
    from its TurnStarted to its TurnFinished."""
    replay, last = await servers.server.client.watch(sid)
    assert [e.sequence for e in replay] == list(range(1, last + 1))
    finished = [e for e in replay if kind(e) == "turn_finished"]
    assert [f.turn_finished.stop_reason for f in finished] == [
        events_pb2.STOP_REASON_INTERRUPTED, events_pb2.STOP_REASON_END_TURN]
    for f in finished:
        turn_events = [e for e in replay if e.turn_id == f.turn_id]
        assert turn_events[-1] == f and kind(turn_events[0]) == "turn_started"
    return replay


@pytest.mark.parametrize("flavour", [Follower, SdkFollower], ids=["raw", "sdk"])
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_followers_see_every_event_once_across_a_restart(
    processes: Processes, workspace: Path, tmp_path: Path, how: signal.Signals, flavour: Any
) -> None:
    servers = Servers(processes, tmp_path / "data", _model(tmp_path))
    async with _following(servers, workspace, tmp_path, flavour) as (sessions, followers):
        ends = await _cut_and_restart(servers, sessions, how)
        await asyncio.wait_for(asyncio.gather(*(f.reach(ends[f.session_id]) for f in followers)), 20)

    for follower, replay in await _each_saw_every_event_once(servers, sessions, followers):
        if flavour is SdkFollower:
            assert len(follower.caught_ups) <= 1  # once (the test may end before it is read)
        else:
            assert follower.events == replay


@contextlib.asynccontextmanager
async def _following(servers: Servers, workspace: Path, tmp_path: Path,
                     flavour: Any) -> AsyncIterator[tuple[list[str], list[Any]]]:
    """The server started, its sessions, and FOLLOWERS_PER_SESSION followers of each (of class
    `flavour`) watching them; the followers stopped and the clients closed on the way out."""
    await servers.start()
    sessions = await _sessions(servers, workspace, tmp_path)
    followers = [flavour(sid, servers) for sid in sessions for _ in range(FOLLOWERS_PER_SESSION)]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.watching.wait() for f in followers)), 20)
        yield sessions, followers
    finally:
        for task in tasks:
            task.cancel()
        await servers.channel.close()
        await servers.sdk.close()


async def _each_saw_every_event_once(servers: Servers, sessions: list[str],
                                     followers: list[Any]) -> list[tuple[Any, list[Any]]]:
    """Checks that each follower saw its session's events 1..last once each, in order; each
    follower with its session's stored events."""
    checked = []
    for sid in sessions:
        replay = await _stored(servers, sid)
        for follower in (f for f in followers if f.session_id == sid):
            assert [e.sequence for e in follower.events] == list(range(1, len(replay) + 1)), follower.errors
            checked.append((follower, replay))
    return checked


NODE = shutil.which("node")
NODE_FOLLOWERS = Path(__file__).parent / "node" / "followers.mjs"
NODE_MODULES = Path(__file__).parents[2] / "clients" / "node" / "node_modules"


@pytest.mark.skipif(NODE is None or not NODE_MODULES.is_dir(), reason="needs node and clients/node's npm install")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_node_followers_see_every_event_once_across_a_restart(
    processes: Processes, workspace: Path, tmp_path: Path, how: signal.Signals
) -> None:
    servers = Servers(processes, tmp_path / "data", _model(tmp_path))
    await servers.start()
    sessions = await _sessions(servers, workspace, tmp_path)
    node = await asyncio.create_subprocess_exec(
        NODE, str(NODE_FOLLOWERS), f"127.0.0.1:{servers.port}", str(FOLLOWERS_PER_SESSION), *sessions,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert (await asyncio.wait_for(node.stdout.readline(), 20)).strip() == b"watching"
        ends = await _cut_and_restart(servers, sessions, how)
        node.stdin.write("".join(f"{sid} {end}\n" for sid, end in ends.items()).encode())
        await node.stdin.drain()
        followers = json.loads(await asyncio.wait_for(node.stdout.read(), 30))  # to its end
    finally:
        if node.returncode is None:
            node.kill()
        await node.wait()
        await servers.channel.close()

    stored = {sid: await _stored(servers, sid) for sid in sessions}
    for follower in followers:
        replay = stored[follower["sid"]]
        assert follower["error"] is None
        assert follower["caughtUps"] <= 1
        assert [e[0] for e in follower["events"]] == [e.sequence for e in replay]
        assert [e[2] for e in follower["events"]] == [e.turn_id for e in replay]
        assert [e[1] for e in follower["events"]] == [kind(e) for e in replay]


async def test_a_follower_that_reads_nothing_through_a_stop_resumes_with_every_event(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # A follower that stops reading (its connection's windows fill) while a busy turn runs, then
    # the server is stopped: whether its stream ends with SHUTTING_DOWN or is cut, a resume after
    # the last event it read gives it the rest, each once.
    (workspace / "big.txt").write_text("".join(f"line {i} {'x' * 200}\n" for i in range(1500)), encoding="utf-8")
    servers = Servers(processes, tmp_path / "data", _model(tmp_path, read="big.txt"))
    server = await servers.start()
    sid = (await server.client.create(workspace)).session_id
    slow = servers.stub.WatchEvents(session_pb2.WatchEventsRequest(session_id=sid, follow=True))
    first = await asyncio.wait_for(slow.read(), 10)
    assert first.HasField("caught_up")
    ends = await _cut_and_restart(servers, [sid], signal.SIGTERM)
    seen: list[events_pb2.Event] = []
    with pytest.raises(grpc.aio.AioRpcError) as broke:
        while (reply := await asyncio.wait_for(slow.read(), 10)) is not grpc.aio.EOF:
            seen.extend(reply.events.events)
    assert broke.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    after = seen[-1].sequence if seen else 0
    rest = servers.stub.WatchEvents(session_pb2.WatchEventsRequest(session_id=sid, after_sequence=after))
    async for reply in rest:
        if reply.HasField("events"):
            seen.extend(reply.events.events)
    await servers.channel.close()
    replay = await _stored(servers, sid)
    assert seen == replay and seen[-1].sequence == ends[sid]


@pytest.mark.parametrize("flavour", [Follower, SdkFollower], ids=["raw", "sdk"])
async def test_followers_resuming_into_another_stop_still_see_every_event_once(
    processes: Processes, workspace: Path, tmp_path: Path, flavour: Any
) -> None:
    # The restarted server is stopped again at once, while its followers replay what they missed.
    servers = Servers(processes, tmp_path / "data", _model(tmp_path))
    async with _following(servers, workspace, tmp_path, flavour) as (sessions, followers):
        client = servers.server.client
        turns = [client.send_stream(sid, "go") for sid in sessions]
        for turn in turns:
            responses = 0
            while responses < STEPS + 1:
                item = await asyncio.wait_for(turn.read(), 20)
                assert item is not grpc.aio.EOF
                responses += kind(item.event) == "model_responded"
        servers.stop(signal.SIGKILL)
        await servers.start()
        servers.stop(signal.SIGTERM)
        client = (await servers.start()).client
        ends = {}
        for sid in sessions:
            events = await client.send(sid, "again")
            ends[sid] = events[-1].sequence
        await asyncio.wait_for(asyncio.gather(*(f.reach(ends[f.session_id]) for f in followers)), 20)
    await _each_saw_every_event_once(servers, sessions, followers)
