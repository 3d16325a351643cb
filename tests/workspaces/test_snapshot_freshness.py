"""A Query call sent to a worker names a snapshot holding every change made before it: another
session's write, on a workspace that overlaps its own, and a change made while no worker was
connected. A worker holding a copy of an older snapshot would read the old files."""

from __future__ import annotations

import asyncio
from pathlib import Path

from codelane.v1 import session_pb2
from tests.pool.conftest import wait_for
from tests.session.conftest import Client, call, kind, read_until, scripted


def _greps(tmp_path: Path, name: str) -> str:
    """Two turns, each one grep (asked for: the test chooses when it runs), for the word needle."""
    def grep(call_id: str) -> dict:
        return call("grep", call_id, pattern="needle", path=".", output_mode="content")

    return scripted(tmp_path, [{"text": "", "tool_calls": [grep("c_grep1")]}, {"text": "done"},
                               {"text": "", "tool_calls": [grep("c_grep2")]}, {"text": "done"}], name=name)


async def _start_until_asked(client: Client, session_id: str, text: str) -> tuple[object, list]:
    stream = client.send_stream(session_id, text)
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    return stream, seen


async def _confirm_and_finish(client: Client, session_id: str, call_id: str, stream, seen: list):
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=session_id, call_id=call_id, approve=True), timeout=10)
    await read_until(stream, lambda r: kind(r.event) == "turn_finished", seen)
    [result] = [r.event.tool_call_finished.result for r in seen if kind(r.event) == "tool_call_finished"]
    return result


async def _first_grep_ran_on_w1(client: Client, workspace: Path, tmp_path: Path, script: str):
    """A session of two confirmed greps (`_greps`) whose first has run, on worker w1, and found the
    old needle."""
    session = await client.create(workspace, _greps(tmp_path, script),
                                  permissions=session_pb2.PermissionPolicy(ask=["grep"]))
    stream, seen = await _start_until_asked(client, session.session_id, "first")
    first = await _confirm_and_finish(client, session.session_id, "c_grep1", stream, seen)
    assert first.worker_id == "w1" and "old needle" in first.output, first
    return session


async def _server_and_synced_worker(make_server, workers, tmp_path: Path, *, local_fallback: bool = False):
    (tmp_path / "elsewhere").mkdir()
    server = await make_server(scripts_dirs=[tmp_path], data_dir=tmp_path / "data", local_fallback=local_fallback)
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "elsewhere"),))  # never shares: syncs
    await wait_for(lambda: server.pool.workers(), what="the worker")
    return server


async def test_a_write_of_the_outer_workspace_reaches_the_inner_workspaces_next_snapshot(
    make_server, workers, tmp_path: Path
) -> None:
    # The outer session's write marked only the outer workspace changed: the inner one's snapshot,
    # taken when its step started, was still current, and a synced worker holding it grepped the
    # old file after the write had ended.
    outer = tmp_path / "ws"
    inner = outer / "sub"
    inner.mkdir(parents=True)
    (inner / "f.txt").write_text("old needle\n")
    server = await _server_and_synced_worker(make_server, workers, tmp_path)
    client = Client(server.address)
    try:
        reader = await _first_grep_ran_on_w1(client, inner, tmp_path, "r.yaml")  # the worker holds a copy

        # The reader's next grep waits for a confirmation, its step's snapshot taken...
        stream, seen = await _start_until_asked(client, reader.session_id, "second")
        await wait_for(lambda: server.snapshots.of(str(inner))._scanning is None, what="the step's scan")
        # ...while the outer session writes the file.
        writer = await client.create(outer, scripted(tmp_path, [
            {"text": "", "tool_calls": [call("write", "c_write", file_path="sub/f.txt", content="new needle\n")]},
            {"text": "done"}], name="w.yaml"))
        events = await client.send(writer.session_id, "write")
        assert kind(events[-1]) == "turn_finished"
        assert (inner / "f.txt").read_text() == "new needle\n"
        second = await _confirm_and_finish(client, reader.session_id, "c_grep2", stream, seen)
        assert not second.is_error, second.output
        assert "new needle" in second.output, second.output
    finally:
        await client.close()


async def test_a_change_made_while_no_worker_was_connected_reaches_the_next_snapshot(
    make_server, workers, tmp_path: Path
) -> None:
    # A step that started with no worker connected asked for no rescan: a worker that connected
    # during the step was sent the snapshot of before the change, and, restarted on the cache
    # its predecessor left, grepped the old file.
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f.txt").write_text("old needle\n")
    # Query tools stay offered (they run here) while no worker is connected.
    server = await _server_and_synced_worker(make_server, workers, tmp_path, local_fallback=True)
    client = Client(server.address)
    try:
        session = await _first_grep_ran_on_w1(client, ws, tmp_path, "s.yaml")

        workers.procs["w1"].terminate()  # drains and leaves
        assert await asyncio.to_thread(workers.procs["w1"].wait, 20) == 0
        await wait_for(lambda: not server.pool.workers(), what="the worker to leave")
        (ws / "f.txt").write_text("new needle\n")  # the user edits the file between turns
        stream, seen = await _start_until_asked(client, session.session_id, "second")
        workers.spawn(server.port, "w1", roots=(str(tmp_path / "elsewhere"),))  # same cache directory
        await wait_for(lambda: server.pool.workers(), what="the worker to come back")
        second = await _confirm_and_finish(client, session.session_id, "c_grep2", stream, seen)
        assert second.worker_id == "w1", second
        assert "new needle" in second.output, second.output
    finally:
        await client.close()
