"""A command runs alone on its workspace across sessions (session_server/workspace_locks.py): the
lock itself, then two sessions of a real server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.pool.types import QueryCall
from session_server.workspace_locks import WaitedTooLong, WorkspaceLocks
from tests.polling import poll_until
from tests.session.conftest import InProcess, call, kind, scripted
from tool_worker.tools.base import ToolResult


async def _holding(locks: WorkspaceLocks, workspace: str, alone: bool, entered: asyncio.Event,
                   leave: asyncio.Event, order: list[str], name: str) -> None:
    async with locks.hold(workspace, alone=alone):
        order.append(name)
        entered.set()
        await leave.wait()


async def test_a_command_waits_for_overlapping_calls_and_they_for_it() -> None:
    locks = WorkspaceLocks()
    order: list[str] = []
    events = {name: (asyncio.Event(), asyncio.Event()) for name in ("read", "command", "nested", "elsewhere")}

    def start(name: str, workspace: str, alone: bool) -> asyncio.Task[None]:
        entered, leave = events[name]
        return asyncio.create_task(_holding(locks, workspace, alone, entered, leave, order, name))

    tasks = [start("read", "/ws", False)]
    await events["read"][0].wait()
    tasks.append(start("command", "/ws", True))  # waits for the read
    tasks.append(start("nested", "/ws/sub", False))  # arrived after the command: waits behind it
    tasks.append(start("elsewhere", "/wsx", False))  # no overlap ("/wsx" is not in "/ws")
    await events["elsewhere"][0].wait()
    assert order == ["read", "elsewhere"]
    events["read"][1].set()
    await events["command"][0].wait()
    assert order == ["read", "elsewhere", "command"]
    events["command"][1].set()
    await events["nested"][0].wait()
    for _, leave in events.values():
        leave.set()
    await asyncio.gather(*tasks)
    assert order == ["read", "elsewhere", "command", "nested"]


async def test_a_waiter_cancelled_leaves_no_trace() -> None:
    locks = WorkspaceLocks()
    entered, leave = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(_holding(locks, "/ws", True, entered, leave, [], "command"))
    await entered.wait()
    heard: list[str | None] = []

    async def wait_then_hold() -> None:
        async with locks.hold("/ws", alone=False, waiting=heard.append):
            pass

    waiter = asyncio.create_task(wait_then_hold())
    await poll_until(lambda: heard, what="the read to wait", interval=0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    leave.set()
    await holder
    async with locks.hold("/ws", alone=True):  # nothing held or waiting is left behind
        pass
    assert heard == ["a command of another session on its workspace to end"]


async def test_a_waiter_past_its_time_limit_is_told_what_held_it_and_leaves_no_trace() -> None:
    locks = WorkspaceLocks()
    entered, leave = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(_holding(locks, "/ws", True, entered, leave, [], "command"))
    await entered.wait()
    with pytest.raises(WaitedTooLong) as waited:
        async with locks.hold("/ws/sub", alone=False, within=0.01):
            raise AssertionError("granted while the command held the workspace")
    assert (waited.value.what, waited.value.within) == ("a command of another session on its workspace to end", 0.01)
    leave.set()
    await holder
    async with locks.hold("/ws", alone=True, within=0.01):  # nothing held or waiting is left behind
        pass


@pytest.mark.parametrize("where", ["same", "inside"])
async def test_another_sessions_calls_wait_for_a_running_command(
    make_server, workspace: Path, tmp_path: Path, where: str
) -> None:
    # A command may swap a directory for a symlink out of the workspace between another call's
    # check of a path and its open: another session's read, run meanwhile, read the server's data
    # directory that way (and a write landed outside the workspace).
    server: InProcess = await make_server()
    client = server.client
    (workspace / "src" / "state.txt").write_text("before\n")
    command = "echo during > src/state.txt; sleep 3; echo after > src/state.txt"
    writer = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_cmd", command=command)]}, {"text": "done"}], name="w.yaml"))
    reader_workspace = workspace if where == "same" else workspace / "src"
    path = "src/state.txt" if where == "same" else "state.txt"
    reader = await client.create(reader_workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("read", "c_read", file_path=path)]}, {"text": "done"}], name="r.yaml"))
    running = asyncio.create_task(client.send(writer.session_id, "go"))
    await poll_until(lambda: (workspace / "src" / "state.txt").read_text() == "during\n",
                     what="the command to start")

    events = await client.send(reader.session_id, "go")
    [read] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert read.output.endswith("after"), read.output  # run once the command had ended
    [command_result] = [e.tool_call_finished.result for e in await running if kind(e) == "tool_call_finished"]
    assert not command_result.is_error, command_result.output


async def test_a_call_waits_for_another_sessions_command_no_longer_than_its_lane_timeout(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # The wait for the hold was outside every deadline: a read of a session whose Query calls
    # time out after 0.5 s waited as long as the other session's command ran (up to its own
    # Execute timeout: 10 min by default, 24 h at most), its turn with it.
    server: InProcess = await make_server()
    client = server.client
    command = "touch started; while [ ! -e release ]; do sleep 0.05; done"
    writer = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_cmd", command=command)]}, {"text": "done"}], name="w.yaml"))
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(
        lane=tools_pb2.LANE_QUERY, timeout=duration_pb2.Duration(nanos=500_000_000))])
    reader = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("read", "c_read", file_path="README.md")]}, {"text": "done"}],
        name="r.yaml"), queue=queue)
    running = asyncio.create_task(client.send(writer.session_id, "go"))
    try:
        await poll_until(lambda: (workspace / "started").exists(), what="the command to start")
        events = await client.send(reader.session_id, "go")
        [read] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
        assert read.error_kind == tools_pb2.ERROR_KIND_TIMEOUT, read.output
        assert "0.5s" in read.output and "another session" in read.output, read.output
        assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
        assert not running.done()  # the command runs on, unaffected
    finally:
        (workspace / "release").touch()
    [command_result] = [e.tool_call_finished.result for e in await running if kind(e) == "tool_call_finished"]
    assert not command_result.is_error, command_result.output


# The lane's timeout was given afresh to each stage of a call: the wait for another session's
# command, then the run (in the server, or each dispatch to a worker, or the fallback), so one
# Query call could take several times its limit. It is one deadline now, from the wait's start.
@pytest.mark.parametrize("where", ["server", "worker"])
async def test_a_call_that_waited_for_another_sessions_command_keeps_its_one_deadline(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    on_worker = where == "worker"
    server: InProcess = await make_server(local_workers=1 if on_worker else 0,
                                          local_worker_tools=["tests.stalling_plugin"], local_fallback=not on_worker)
    client = server.client
    if on_worker:
        await client.wait_workers("local-1")
    pool = server.server.pool
    dispatched: list[tuple[float, float]] = []  # (when, the time it was given)

    async def dispatch(query_call: QueryCall) -> ToolResult:
        dispatched.append((time.monotonic(), query_call.timeout))
        return await pool_dispatch(query_call)

    pool_dispatch = pool.dispatch
    monkeypatch.setattr(pool, "dispatch", dispatch)
    limit = 2.0
    command = "touch started; while [ ! -e release ]; do sleep 0.05; done"
    writer = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_cmd", command=command)]}, {"text": "done"}], name="w.yaml"))
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(
        lane=tools_pb2.LANE_QUERY, timeout=duration_pb2.Duration(seconds=int(limit)))])
    record, never = tmp_path / "record.json", tmp_path / "never"
    reader = await client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("stall", "c_stall", record=str(record), until=str(never))]},
        {"text": "done"}], name="r.yaml"), queue=queue)
    locks = server.server.sessions.workspace_locks
    running = asyncio.create_task(client.send(writer.session_id, "go"))
    try:
        await poll_until(lambda: (workspace / "started").exists(), what="the command to start")
        reading = asyncio.create_task(client.send(reader.session_id, "go"))
        await poll_until(lambda: locks._waiting or reading.done(), what="the read to wait for the command",
                         interval=0.01)
        # The read waited for part of its time; what is left of it bounds the rest.
        released = time.monotonic()
        (workspace / "release").touch()
        events = await reading
    finally:
        (workspace / "release").touch()
        never.touch()
    [stalled] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert stalled.error_kind == tools_pb2.ERROR_KIND_TIMEOUT, stalled.output
    # Its message names the call's whole limit, not what was left of it.
    place = "on worker local-1" if on_worker else "on the session server"
    assert stalled.output == f"stall timed out after {limit:g}s {place}", stalled.output
    # It ran against the deadline set before the command ended; given the whole limit again
    # once the command ended, it would have ended past `released + limit`.
    if on_worker:
        [(when, given)] = dispatched
        assert when + given < released + limit, (when, given, released)
    else:
        deadline = json.loads(record.read_text(encoding="utf-8"))["deadline"]
        assert deadline < released + limit, (deadline, released)
    [command_result] = [e.tool_call_finished.result for e in await running if kind(e) == "tool_call_finished"]
    assert not command_result.is_error, command_result.output
