"""A history that is not in memory is loaded off the event loop when a turn starts: the server
serves the other calls meanwhile, messages sent at once to the session start one turn from one
load, a message to a session whose turn runs loads nothing, and a store that fails the read fails
the SendMessage as any store failure does."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from codelane.v1 import events_pb2, session_pb2
from session_server.admission import Limits
from session_server.store import Reads, StoredMessage
from tests.session.conftest import (
    InProcess,
    call,
    collect,
    error_details,
    kind,
    read_rest,
    read_until,
    rpc_error,
    scripted,
)

BOUND = 10.0  # bound on every wait: a hang fails instead of blocking


async def test_messages_sent_at_once_while_the_history_loads_start_one_turn_and_the_server_serves_on(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: InProcess = await make_server()
    client = server.client
    model = scripted(tmp_path, [{"text": "Done."}])
    session = (await client.create(workspace, model)).session_id
    other = (await client.create(workspace, model)).session_id
    loop = asyncio.get_running_loop()
    holding, release = asyncio.Event(), threading.Event()
    loads: list[str] = []
    # Whether each load went on because the test released it: not when it held the server's loop.
    released: list[bool] = []
    get_messages = Reads.get_messages

    def held(self: Reads, session_id: str, *args: Any, **kwargs: Any) -> list[StoredMessage]:
        loads.append(session_id)
        loop.call_soon_threadsafe(holding.set)
        released.append(release.wait(BOUND))
        return get_messages(self, session_id, *args, **kwargs)

    monkeypatch.setattr(Reads, "get_messages", held)
    first, second = (asyncio.create_task(collect(client.send_stream(session, "go"))) for _ in range(2))
    await asyncio.wait_for(holding.wait(), BOUND)
    # Other calls are served while the history loads.
    assert (await client.get(other)).session_id == other
    release.set()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    [events] = [o for o in outcomes if not isinstance(o, BaseException)]
    [refused] = [error_details(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert kind(events[-1].event) == "turn_finished"
    assert events[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION and refused.reason == "TURN_IN_PROGRESS"
    assert loads == [session] and released == [True]  # one load, shared, and the server served meanwhile
    assert len(await client.history(session)) == 2


async def test_a_history_the_store_fails_to_read_fails_the_message_as_unavailable(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As when the read ran on the loop: UNAVAILABLE, STORE_UNAVAILABLE, one line in the log; no
    # turn starts, and the next message, the store well again, runs one.
    server: InProcess = await make_server()
    client = server.client
    session = (await client.create(workspace, scripted(tmp_path, [{"text": "Done."}]))).session_id
    failures = [sqlite3.OperationalError("disk I/O error")]
    get_messages = Reads.get_messages

    def failing(self: Reads, *args: Any, **kwargs: Any) -> list[StoredMessage]:
        if failures:
            raise failures.pop()
        return get_messages(self, *args, **kwargs)

    monkeypatch.setattr(Reads, "get_messages", failing)
    caplog.set_level(logging.ERROR)
    error = await rpc_error(collect(client.send_stream(session, "go")))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "STORE_UNAVAILABLE", error
    assert "disk I/O error" in error.message
    assert [(r.levelname, r.exc_info) for r in caplog.records if "SendMessage" in r.getMessage()] == [
        ("ERROR", None)]
    assert (await client.get(session)).state == session_pb2.SESSION_STATE_IDLE
    assert server.server.sessions is not None and server.server.sessions.running_turns() == 0
    events = await client.send(session, "go")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN


async def test_a_message_to_a_session_whose_turn_runs_loads_nothing(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running turn appends to its history: a load beside it would cache a history missing
    # what the turn adds after the read, for the next turn to send the model.
    server: InProcess = await make_server()
    client, manager = server.client, server.server.sessions
    assert manager is not None
    # The turn waits for a confirmation no one gives: it runs until it is cancelled.
    model = scripted(tmp_path, [{"text": "Writing.", "tool_calls": [call("write", file_path="x.txt", content="x")]}])
    session = (await client.create(workspace, model, permissions=session_pb2.PermissionPolicy(ask=["write"])))
    first = client.send_stream(session.session_id, "go")
    await read_until(first, lambda r: kind(r.event) == "confirmation_required", [])
    manager.histories.forget(session.session_id)  # as the cache drops it for others
    loads: list[str] = []
    get_messages = Reads.get_messages

    def counted(self: Reads, session_id: str, *args: Any, **kwargs: Any) -> list[StoredMessage]:
        loads.append(session_id)
        return get_messages(self, session_id, *args, **kwargs)

    monkeypatch.setattr(Reads, "get_messages", counted)
    error = await rpc_error(collect(client.send_stream(session.session_id, "again")))
    assert error.reason == "TURN_IN_PROGRESS" and loads == []
    assert await client.cancel(session.session_id)
    rest = await read_rest(first)
    assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED


async def test_a_turn_the_server_has_no_room_for_loads_no_history(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # One turn at most: a message to a second session is refused before its history is read
    # (a history of a gigabyte took about a second to read, for a turn refused anyway).
    server: InProcess = await make_server(limits=Limits(max_running_turns=1))
    client = server.client
    busy = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c1", command="true")]}, {"text": "Done."}], "busy.yaml"),
        permissions=session_pb2.PermissionPolicy(ask=["bash"]))
    stream = client.send_stream(busy.session_id, "go")
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", [])
    other = await client.create(workspace, scripted(tmp_path, [{"text": "Done."}], "other.yaml"))
    refused = await rpc_error(client.send(other.session_id, "hello"))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    histories = server.server.sessions.histories
    assert histories.cached(other.session_id) is None and other.session_id not in histories._loading
    await client.cancel(busy.session_id)
    await read_rest(stream)
