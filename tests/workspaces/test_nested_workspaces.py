"""Sessions whose workspaces overlap (one inside the other) see each other's writes: a Query call
sent to a worker after another session's write ended names a snapshot that holds it."""

from __future__ import annotations

from pathlib import Path

from codelane.v1 import session_pb2
from tests.pool.conftest import wait_for
from tests.session.conftest import Client, call, kind, read_until, scripted


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
    (tmp_path / "elsewhere").mkdir()
    server = await make_server(scripts_dirs=[tmp_path], data_dir=tmp_path / "data", local_fallback=False)
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "elsewhere"),))  # never shares: syncs
    await wait_for(lambda: server.pool.workers(), what="the worker")
    client = Client(server.address)
    try:
        def grep(call_id: str) -> dict:
            return call("grep", call_id, pattern="needle", path=".", output_mode="content")

        reader = await client.create(inner, scripted(tmp_path, [
            {"text": "", "tool_calls": [grep("c_grep1")]}, {"text": "done"},
            {"text": "", "tool_calls": [grep("c_grep2")]}, {"text": "done"}], name="r.yaml"),
            permissions=session_pb2.PermissionPolicy(ask=["grep"]))

        def confirm(call_id: str) -> session_pb2.ConfirmToolCallRequest:
            return session_pb2.ConfirmToolCallRequest(session_id=reader.session_id, call_id=call_id, approve=True)

        stream = client.send_stream(reader.session_id, "first")  # the worker syncs the inner workspace
        seen: list = []
        await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
        await client.sessions.ConfirmToolCall(confirm("c_grep1"), timeout=10)
        await read_until(stream, lambda r: kind(r.event) == "turn_finished", seen)
        [first] = [r.event.tool_call_finished.result for r in seen if kind(r.event) == "tool_call_finished"]
        assert first.worker_id == "w1" and "old needle" in first.output, first

        # The reader's next grep waits for a confirmation, its step's snapshot taken...
        stream = client.send_stream(reader.session_id, "second")
        seen = []
        await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
        await wait_for(lambda: server.snapshots.of(str(inner))._scanning is None, what="the step's scan")
        # ...while the outer session writes the file.
        writer = await client.create(outer, scripted(tmp_path, [
            {"text": "", "tool_calls": [call("write", "c_write", file_path="sub/f.txt", content="new needle\n")]},
            {"text": "done"}], name="w.yaml"))
        events = await client.send(writer.session_id, "write")
        assert kind(events[-1]) == "turn_finished"
        assert (inner / "f.txt").read_text() == "new needle\n"
        await client.sessions.ConfirmToolCall(confirm("c_grep2"), timeout=10)
        await read_until(stream, lambda r: kind(r.event) == "turn_finished", seen)
        [second] = [r.event.tool_call_finished.result for r in seen if kind(r.event) == "tool_call_finished"]
        assert not second.is_error, second.output
        assert "new needle" in second.output, second.output
    finally:
        await client.close()
