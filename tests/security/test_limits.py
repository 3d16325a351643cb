"""Bounded inputs: a model's huge arguments or thousands of calls, a client's or a worker's bulky
metadata, cannot break a session."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from codelane.v1 import tools_pb2
from session_server.limits import MAX_TOOL_CALLS_PER_RESPONSE, OMITTED_ARGUMENTS
from session_server.llm.script import Script
from session_server.mock_llm.server import start_mock_llm
from tests.polling import poll_until
from tests.session.conftest import assert_gap_free, call, kind, rpc_error, scripted
from tool_worker import wire

HUGE = 70 * 1024 * 1024


@pytest.fixture
async def huge_write_model(monkeypatch: pytest.MonkeyPatch):
    """An OpenAI-compatible model whose first answer is a `write` of 70 MB, sent in one piece."""
    script = Script.from_data({"responses": [
        {"text": "Writing.", "tool_calls": [call("write", "big", file_path="big.txt", content="x" * HUGE),
                                            call("read", "small", file_path="a.txt")]},
        {"text": "Done."},
    ]})
    runner, url = await start_mock_llm(script, quirks=["whole_arguments"])
    monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    yield "openai:mock"
    await runner.cleanup()


async def test_a_70_mb_argument_is_refused_and_the_session_stays_readable(
    client, workspace, huge_write_model
) -> None:
    session = await client.create(workspace, huge_write_model)
    events = await client.send(session.session_id, "write it", within=120)
    assert kind(events[-1]) == "turn_finished"
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert results["big"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "over the limit" in results["big"].output
    assert not results["small"].is_error  # its sibling ran
    assert not (workspace / "big.txt").exists()
    # The stream, its replay from 0 and the history all still work.
    replayed, last = await client.watch(session.session_id, 0)
    assert_gap_free(replayed)
    assert last == events[-1].sequence
    history = await client.history(session.session_id)
    calls = {c.call_id: c for m in history for c in m.tool_calls}
    assert calls["big"].arguments_json == OMITTED_ARGUMENTS
    assert json.loads(calls["small"].arguments_json) == {"file_path": "a.txt"}
    assert sum(m.ByteSize() for m in history) < 1024 * 1024


async def test_thousands_of_calls_in_one_response_are_capped(client, workspace, tmp_path) -> None:
    count = 3000
    model = scripted(tmp_path, [
        {"tool_calls": [call("no_such_tool", f"c{i}", n=i) for i in range(count)]},
        {"text": "done"},
    ])
    session = await client.create(workspace, model)
    events = await client.send(session.session_id, "go", within=120)
    assert kind(events[-1]) == "turn_finished"
    results = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert len(results) == count  # every call is answered
    kinds = [r.error_kind for r in results]
    assert kinds.count(tools_pb2.ERROR_KIND_UNKNOWN_TOOL) == MAX_TOOL_CALLS_PER_RESPONSE
    over = [r for r in results if r.error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS]
    assert len(over) == count - MAX_TOOL_CALLS_PER_RESPONSE
    assert f"at most {MAX_TOOL_CALLS_PER_RESPONSE} per response" in over[0].output


async def test_an_external_clients_bulky_or_deep_metadata_cannot_break_the_session(
    make_server, workspace, tmp_path
) -> None:
    # Parsed and written again, a compact 46 MB metadata array came back at 69 MB: over gRPC's
    # message limit, the session's stream, replay and history failed for good. JSON nested past
    # Python's recursion limit ended the RPC with UNKNOWN.
    from tests.session.test_external_tasks import EXTERNAL, _claim, _complete, _queue

    server = await make_server()
    client = server.client
    model = scripted(tmp_path, [{"tool_calls": [call("bash", "ext", command="true")]}, {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    stream = client.send_stream(session.session_id, "go")
    [task] = await _claim(client, session.session_id, "cli", wait=10)
    bulky = "[" + ",".join("0" * (wire.MAX_METADATA_JSON_CHARS // 2 + 1)) + "]"
    error = await rpc_error(_complete(client, session.session_id, task.task_id, "cli", output="ok",
                                      metadata_json=bulky))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "result.metadata_json"}
    assert "at most 65,536" in error.message
    # Refused and nothing changed: the task is still the client's to complete.
    deep = "[" * 100_000
    await _complete(client, session.session_id, task.task_id, "cli", output="ok", metadata_json=deep[:60_000])
    events = [r.event async for r in stream]
    assert kind(events[-1]) == "turn_finished"
    [finished] = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
    assert json.loads(finished.result.metadata_json)["unparsed_metadata"] == deep[:60_000]
    replayed, last = await client.watch(session.session_id, 0)
    assert_gap_free(replayed)
    assert last == events[-1].sequence
    assert await client.history(session.session_id)


def test_a_workers_bulky_or_deep_metadata_is_kept_bounded() -> None:
    bulky = wire.result_from_proto(tools_pb2.ToolResult(output="x", metadata_json="[" + "0," * 40_000 + "0]"))
    assert bulky.metadata == {"omitted_by_codelane": "metadata_json was 80,003 characters; at most 65,536 are kept"}
    deep = wire.result_from_proto(tools_pb2.ToolResult(output="x", metadata_json="[" * 10_000))
    assert deep.metadata == {"unparsed_metadata": "[" * 10_000}
    assert wire.result_from_proto(tools_pb2.ToolResult(metadata_json='{"n": 1}')).metadata == {"n": 1}


async def _turn_answered_by_a_raw_worker(make_server, workspace, tmp_path, answer: tools_pb2.ToolResult):
    """A session's turn whose one call, `echo`, a worker speaking the raw protocol answers with
    `answer`; returns the client, the session and the turn's events."""
    from codelane.v1 import worker_pb2, worker_pb2_grpc

    server = await make_server()
    client = server.client
    spec = tools_pb2.ToolSpec(name="echo", lane=tools_pb2.LANE_QUERY, idempotent=True,
                              parameters_json_schema='{"type": "object"}')
    outbox: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()
    await outbox.put(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(worker_id="liar", slots=1, tools=[spec])))

    async def requests():
        while True:
            yield await outbox.get()

    async def answering(stream) -> None:
        async for message in stream:
            for assign in message.assignments.assigns:
                answers = worker_pb2.CallResults()
                answers.results.add(call_id=assign.call_id, attempt=assign.attempt, dispatch_id=assign.dispatch_id,
                                    result=answer)
                await outbox.put(worker_pb2.ConnectRequest(results=answers))

    async with grpc.aio.insecure_channel(client.address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect(requests())
        task = asyncio.create_task(answering(stream))
        try:
            await poll_until(lambda: server.server.pool.offers("echo"), what="the raw worker to join")
            model = scripted(tmp_path, [{"tool_calls": [call("echo", "e1")]}, {"text": "Done."}])
            session = await client.create(workspace, model)
            events = await client.send(session.session_id, "go")
        finally:
            task.cancel()
    assert kind(events[-1]) == "turn_finished"
    return client, session, events


async def test_a_workers_absurd_run_time_cannot_break_the_session(make_server, workspace, tmp_path) -> None:
    # A worker reports how long its tool ran. Duration(seconds=2**63-1) came through as 9.2e18 s,
    # which no Duration can carry back (its nanoseconds overflow int64): the call's event and its
    # history message could not be written, and the session's stream, replay and history failed.
    answer = tools_pb2.ToolResult(output="echoed")
    answer.run_time.seconds = 2**63 - 1
    client, session, events = await _turn_answered_by_a_raw_worker(make_server, workspace, tmp_path, answer)
    [finished] = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
    assert finished.result.output == "echoed" and finished.run_time.seconds < 3600
    replayed, last = await client.watch(session.session_id, 0)
    assert_gap_free(replayed)
    assert last == events[-1].sequence
    assert await client.history(session.session_id)


@pytest.mark.parametrize("value", ["NaN", "-Infinity", "1e400"])
async def test_a_workers_metadata_that_only_python_reads_as_json_is_kept_as_text(
    make_server, workspace, tmp_path, value: str
) -> None:
    # Python's json reads NaN, Infinity and 1e400 (as inf) and writes them back as NaN and
    # Infinity, which no JSON parser takes: the call's metadata_json went out as no JSON at all
    # (and its replay, written by orjson, said null instead).
    metadata = f'{{"score": {value}}}'
    client, session, events = await _turn_answered_by_a_raw_worker(
        make_server, workspace, tmp_path, tools_pb2.ToolResult(output="echoed", metadata_json=metadata))
    replayed, _ = await client.watch(session.session_id, 0)
    for stream in (events, replayed):
        [finished] = [e.tool_call_finished for e in stream if kind(e) == "tool_call_finished"]
        assert json.loads(finished.result.metadata_json, parse_constant=_no_constant) == {"unparsed_metadata": metadata}


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")
