"""A model cannot wedge the workers: a FIFO in the workspace is refused, never waited on."""

from __future__ import annotations

import os

from google.protobuf import duration_pb2

from codelane.v1 import session_pb2, tools_pb2
from tests.session.conftest import call, kind, scripted

READS = 16


async def test_reads_of_a_fifo_leave_the_workers_serving(make_server, workspace, tmp_path) -> None:
    os.mkfifo(workspace / "pipe")
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("still served\n")
    # More reads of the FIFO than the two workers have slots, all at once.
    model = scripted(tmp_path, [{"tool_calls": [call("read", f"r{i}", file_path="pipe") for i in range(READS)]},
                                {"text": "done"}], name="fifo.yaml")
    after = scripted(tmp_path, [{"tool_calls": [call("read", "ok", file_path="file.txt"),
                                                call("grep", "grep", pattern="still")]},
                                {"text": "done"}], name="after.yaml")
    server = await make_server(local_workers=2, local_worker_slots=4, local_fallback=False)
    await server.client.wait_workers("local-1", "local-2")
    # A blocked read would end in a timeout: a short one keeps the test quick either way.
    queue = session_pb2.QueueConfig(
        query_concurrency=READS,
        lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, timeout=duration_pb2.Duration(seconds=5))],
    )
    session = await server.client.create(workspace, model, queue=queue)
    events = await server.client.send(session.session_id, "read the pipe", within=60)
    results = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert len(results) == READS
    for result in results:
        assert result.error_kind == tools_pb2.ERROR_KIND_TOOL_ERROR and "FIFO" in result.output, result.output
        assert result.worker_id.startswith("local-")
    # The workers are not stuck: other workspaces are still read, and searched.
    session = await server.client.create(other, after)
    events = await server.client.send(session.session_id, "read", within=60)
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert "still served" in results["ok"].output and results["ok"].worker_id.startswith("local-")
    assert "file.txt" in results["grep"].output
