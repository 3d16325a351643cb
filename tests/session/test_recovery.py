"""Crash recovery closes every call a turn announced: a kill -9 of the server while a `bash` runs
and the calls after it wait behind it, then a restart on the same data dir."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from codelane.v1 import events_pb2
from tests.polling import poll_until
from tests.session.conftest import Processes, call, kind, read_until, scripted


async def test_every_announced_call_gets_its_result_after_a_crash(
    processes: Processes, workspace: Path, tmp_path: Path, mark: str
) -> None:
    # The sleep never ends on its own: the bash is still running when the server is killed.
    model = scripted(tmp_path, [
        {"text": "One slow command, then more.", "tool_calls": [
            call("bash", "slow", command=f"echo $$ > slow.pid; sleep {mark}"),
            call("read", "after_read", file_path="a.txt"),
            call("write", "after_write", file_path="b.txt", content="b\n"),
            call("grep", "after_grep", pattern="needle"),
        ]},
        {"text": "Done."},
    ])
    data_dir = tmp_path / "data"
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    stream = server.client.send_stream(session.session_id, "go")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", seen)
    pid_file = workspace / "slow.pid"
    await poll_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", what="the bash to start")
    server.kill9()
    processes.kill_pid_file(pid_file)
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(stream.read(), 10)

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay, _ = await server.client.watch(session.session_id)
    [announced] = [e.model_responded for e in replay if kind(e) == "model_responded"]
    assert [c.call_id for c in announced.tool_calls] == ["slow", "after_read", "after_write", "after_grep"]
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in replay
                if kind(e) == "tool_call_finished"}
    assert set(finished) == {"slow", "after_read", "after_write", "after_grep"}
    assert all(r.is_error and "interrupted" in r.output for r in finished.values())
    assert replay[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    # What the turn did before the crash is counted, as a cancelled turn's TurnFinished counts it.
    assert replay[-1].turn_finished.model_requests == 1
    assert replay[-1].turn_finished.tool_calls == 4
    assert replay[-1].turn_finished.usage == announced.usage
    assert not (workspace / "b.txt").exists()  # what waited behind the bash never ran
