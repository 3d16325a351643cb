"""A turn whose last events the store cannot take (its disk is full) is not over until they are
stored: the session stays running, no turn starts over them, and they are stored and sent once
there is room again, or, if the server stops first, the next start ends the turn as interrupted,
as after a crash. A call the store fails ends UNAVAILABLE (STORE_UNAVAILABLE), saying what to do.

The store is on a real full disk: a small tmpfs (root only, as in CI), filled with a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from tests.polling import poll_until
from tests.session.conftest import (
    Client,
    ErrorDetails,
    EventStream,
    InProcess,
    Processes,
    assert_gap_free,
    call,
    collect,
    kind,
    read_until,
    rpc_error,
    scripted,
)

PLUGIN = "benchmarks.plugin_tools"
# Far more than the store's WAL holds when the disk fills: committing this one result needs room.
BIG_OUTPUT_CHARS = 400_000


class SmallDisk:
    """A 16 MiB tmpfs that the test fills and frees."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        with self._filler.open("ab") as filler:
            with contextlib.suppress(OSError):  # ENOSPC: full
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Listed before the server fixtures, so that their processes are gone when it unmounts."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # a process of the test holds it yet


def _model(tmp_path: Path) -> str:
    return scripted(tmp_path, [
        {"text": "Fetching.", "tool_calls": [call("bulky", "big", chars=BIG_OUTPUT_CHARS)]},
        {"text": "Done."},
        {"text": "Next turn done."},
    ])


ASK_BULKY = session_pb2.PermissionPolicy(ask=["bulky"])


async def _turn_ended_unstored(client: Client, disk: SmallDisk, session_id: str) -> tuple[EventStream, list[Any]]:
    """Starts a turn, fills the disk while its call waits for a confirmation, lets the call run,
    and returns once the turn has ended without its last events stored: the session's stream and
    what it received."""
    stream = client.send_stream(session_id, "go")
    seen: list[Any] = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    if "model_responded" not in {kind(r.event) for r in seen}:
        await read_until(stream, lambda r: kind(r.event) == "model_responded", seen)
    disk.fill()
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=session_id, call_id="big", approve=True), timeout=10)

    async def refused() -> ErrorDetails | None:
        details = await rpc_error(client.send(session_id, "again"))
        return None if details.reason == "TURN_IN_PROGRESS" else details

    # Refused with TURN_IN_PROGRESS while the turn runs, then for its events waiting to be stored.
    details = await poll_until(refused, within=30, what="SendMessage to be refused for the turn's unstored events")
    assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "STORE_UNAVAILABLE", details
    assert details.metadata == {"sqlite_error": "SQLITE_FULL"}
    assert "not stored yet" in details.message and "disk" in details.message, details.message
    # The turn is not over as far as anyone can see: running, and no TurnFinished stored.
    session = await client.get(session_id)
    assert session.state == session_pb2.SESSION_STATE_RUNNING
    stored, last = await client.watch(session_id)
    assert last == session.last_sequence
    assert "turn_finished" not in [kind(e) for e in stored]
    return stream, seen


async def test_a_turn_whose_end_waits_for_room_finishes_once_it_is_stored(
    small_disk: SmallDisk, make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(data_dir=small_disk.path / "data", local_worker_tools=[PLUGIN])
    client = server.client
    session = await client.create(workspace, _model(tmp_path), permissions=ASK_BULKY)
    stream, seen = await _turn_ended_unstored(client, small_disk, session.session_id)

    small_disk.free()
    # The event log's retry stores the rest, and only then sends it: the turn's own stream ends.
    seen += await collect(stream)
    events = [r.event for r in seen]
    assert_gap_free(events)
    assert [kind(e) for e in events].count("turn_finished") == 1 and kind(events[-1]) == "turn_finished"
    finished = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
    assert [(f.call_id, len(f.result.output)) for f in finished] == [("big", BIG_OUTPUT_CHARS)]
    idle = await client.get(session.session_id)
    assert (idle.state, idle.last_sequence) == (session_pb2.SESSION_STATE_IDLE, events[-1].sequence)
    # The next turn starts. (Its model asks for the same call: the history could not keep the
    # response whose call ran. Denied, the turn ends.)
    following = client.send_stream(session.session_id, "again")
    started: list[Any] = []
    await read_until(following, lambda r: kind(r.event) == "confirmation_required", started)
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=session.session_id, call_id="big", approve=False), timeout=10)
    rest = [r.event for r in await collect(following)]
    assert rest[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN


async def test_a_call_the_store_cannot_take_is_unavailable_and_says_what_to_do(
    small_disk: SmallDisk, make_server, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = scripted(tmp_path, [{"text": "Done."}])
    server: InProcess = await make_server(data_dir=small_disk.path / "data", model=model)
    client = server.client
    kept = await client.create(workspace)
    small_disk.fill()
    # Far more than the store's WAL holds: storing it needs room on the disk.
    prompt = "x" * 200_000
    caplog.clear()
    details = await rpc_error(client.create(workspace, system_prompt=prompt))
    assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "STORE_UNAVAILABLE", details
    assert details.metadata == {"sqlite_error": "SQLITE_FULL"}
    assert "disk" in details.message and "free space" in details.message, details.message
    # One line in the log saying why, and no traceback (grpc logs one for an exception it meets).
    assert [(r.levelname, r.exc_info) for r in caplog.records if "CreateSession" in r.getMessage()] == [
        ("ERROR", None)]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert (await client.get(kept.session_id)).session_id == kept.session_id  # reads go on
    small_disk.free()
    assert (await client.create(workspace, system_prompt=prompt)).config.system_prompt == prompt


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
async def test_a_turn_whose_end_could_not_be_stored_is_interrupted_by_the_next_start(
    small_disk: SmallDisk, processes: Processes, workspace: Path, tmp_path: Path, stop: str
) -> None:
    data_dir = small_disk.path / "data"
    model = _model(tmp_path)
    args = ("--tools", PLUGIN)
    server = await processes.start_server(data_dir, model=model, local_workers=0, args=args)
    session = await server.client.create(workspace, permissions=ASK_BULKY)
    stream, seen = await _turn_ended_unstored(server.client, small_disk, session.session_id)

    if stop == "kill9":
        server.kill9()
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stream)
    else:
        server.proc.send_signal(signal.SIGTERM)
        # What the stopping server tells the turn's stream must be true: not "nothing is lost".
        details = await rpc_error(collect(stream))
        assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "SHUTTING_DOWN", details
        assert "could not be stored" in details.message and "interrupted" in details.message, details.message
        assert "nothing is lost" not in details.message
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        assert "could not be stored before the stop" in server.log()
    small_disk.free()

    server = await processes.start_server(data_dir, model=model, local_workers=0, args=args)
    client = server.client
    assert (await client.get(session.session_id)).state == session_pb2.SESSION_STATE_IDLE
    replay, _ = await client.watch(session.session_id)
    assert_gap_free(replay)
    stored = {e.sequence: e for e in replay}
    assert all(stored[r.event.sequence] == r.event for r in seen)  # what the client saw is kept
    kinds = [kind(e) for e in replay]
    assert kinds.count("turn_finished") == 1 and kinds[-1] == "turn_finished"
    assert replay[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    [finished] = [e.tool_call_finished for e in replay if kind(e) == "tool_call_finished"]
    assert finished.call_id == "big" and finished.result.error_kind == tools_pb2.ERROR_KIND_CANCELLED
    # The history kept the response whose call the stop cut off, so the model goes on from it.
    following = await client.send(session.session_id, "again")
    assert following[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN

