"""A subprocess server with two local workers, a mock LLM over HTTP (OpenAI and Anthropic wire
formats), and a kill -9 of the server in the middle of a turn followed by a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.mock_llm import MOCK_LLM_KEY, MockLLM, start_mock_llm
from tests.polling import poll_until
from tests.processes import all_gone, kill_all, marker, pids_with
from tests.session.conftest import (
    Processes,
    assert_gap_free,
    call,
    kind,
    read_until,
    write_script,
)

WORKERS = {"local-1", "local-2"}
# The sleep's argument marks it on the host (the sandbox's PID namespace hides its real pid).
SLOW_MARK = marker()
SLOW_BASH = f"sleep {SLOW_MARK}"


@pytest.fixture
async def mock_llm(tmp_path: Path) -> AsyncIterator[tuple[MockLLM, str]]:
    greps = [
        call("grep", f"grep_{i}", pattern=p) for i, p in enumerate(["needle", "def", "alpha", "beta", "demo", "x"])
    ]
    script = write_script(
        tmp_path,
        [
            {
                "text": "Searching the code.",
                "tool_calls": [
                    *greps,
                    call("write", "write_notes", file_path="notes.txt", content="fresh notes\n"),
                    call("read", "read_notes", file_path="notes.txt"),
                ],
            },
            {"text": "Found everything."},
            {"text": "Now something slow.", "tool_calls": [call("bash", "slow_bash", command=SLOW_BASH)]},
            {"text": "All done."},
        ],
        name="http-script.yaml",
    )
    runner, url = await start_mock_llm(script, host="127.0.0.1", port=0)
    try:
        yield runner.app[MOCK_LLM_KEY], url
    finally:
        await runner.cleanup()


def _started(events: list[events_pb2.Event]) -> dict[str, events_pb2.ToolCallStarted]:
    return {e.tool_call_started.call.call_id: e.tool_call_started for e in events if kind(e) == "tool_call_started"}


async def test_workers_crash_and_restart_over_http(
    processes: Processes, mock_llm: tuple[MockLLM, str], workspace: Path, tmp_path: Path
) -> None:
    mock, url = mock_llm
    data_dir = tmp_path / "data"
    env = {"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": "test"}
    # Every Query call goes to the workers, the small read after the write included: the test is
    # of read-your-writes through them.
    server = await processes.start_server(data_dir, model="openai:mock", env=env, args=("--no-local-cheap-calls",))
    client = server.client
    await client.wait_workers(*WORKERS)

    session = await client.create(workspace)  # the server's default model
    assert session.config.model == "openai:mock"
    sid = session.session_id

    # Turn 1: six greps fan out to the real workers; the write runs on the server, in order.
    turn1 = await client.send(sid, "find the needles")
    assert_gap_free(turn1)
    assert turn1[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN, turn1[-1]
    started = _started(turn1)
    greps = {f"grep_{i}" for i in range(6)}
    assert set(started) == {*greps, "write_notes", "read_notes"}
    for call_id in greps:
        assert started[call_id].worker_id in WORKERS, started[call_id]
        assert started[call_id].lane == tools_pb2.LANE_QUERY
    assert started["write_notes"].worker_id == "local" and started["write_notes"].lane == tools_pb2.LANE_EXECUTE
    assert started["read_notes"].worker_id in WORKERS
    results = {
        e.tool_call_finished.call_id: e.tool_call_finished.result for e in turn1 if kind(e) == "tool_call_finished"
    }
    assert not any(r.is_error for r in results.values()), results
    assert "fresh notes" in results["read_notes"].output  # the read after the write sees it
    assert {results[c].worker_id for c in greps} <= WORKERS
    # The model got the results in model order, over the OpenAI wire format.
    tool_ids = [m["tool_call_id"] for m in mock.requests[1].body["messages"] if m["role"] == "tool"]
    assert tool_ids == [f"grep_{i}" for i in range(6)] + ["write_notes", "read_notes"]

    # Turn 2: kill -9 the server while a slow bash call runs.
    stream = client.send_stream(sid, "now the slow part")
    seen: list = []
    await read_until(
        stream,
        lambda r: kind(r.event) == "tool_call_started" and r.event.tool_call_started.call.call_id == "slow_bash",
        seen,
    )
    await poll_until(lambda: bool(pids_with(SLOW_MARK)), what="slow bash to start")
    turn2_seen = [r.event for r in seen]
    turn2_id = turn2_seen[0].turn_id
    server.kill9()
    try:
        # The sandboxed bash and its sleep die with the server (the old workers die at teardown).
        assert await all_gone(SLOW_MARK)
    finally:
        kill_all(SLOW_MARK)
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await asyncio.wait_for(stream.read(), 10)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

    # Restart with the same data dir.
    server = await processes.start_server(data_dir, model="openai:mock", env=env, args=("--no-local-cheap-calls",))
    client = server.client

    listed = await client.sessions.ListSessions(session_pb2.ListSessionsRequest(), timeout=10)
    assert [s.session_id for s in listed.sessions] == [sid]
    restored = await client.get(sid)
    assert restored.state == session_pb2.SESSION_STATE_IDLE
    assert restored.workspace == session.workspace and restored.config == session.config

    # History: turn 1 complete; turn 2's user message, and the response the crash cut off with
    # its call's result (interrupted), as a CancelTurn leaves it: the model sees what it started.
    history = await client.history(sid)
    roles = [m.role for m in history]
    assert roles == [
        session_pb2.MESSAGE_ROLE_USER,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        *[session_pb2.MESSAGE_ROLE_TOOL] * 8,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        session_pb2.MESSAGE_ROLE_USER,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        session_pb2.MESSAGE_ROLE_TOOL,
    ]
    assert [m.tool_call_id for m in history[2:10]] == [c.call_id for c in history[1].tool_calls]
    assert history[10].text == "Found everything." and history[11].text == "now the slow part"
    assert history[12].text == "Now something slow." and [c.call_id for c in history[12].tool_calls] == ["slow_bash"]
    assert history[13].tool_call_id == "slow_bash" and history[13].tool_result.is_error
    assert "interrupted" in history[13].tool_result.output
    assert restored.message_count == len(history)

    # Every stored event replays, gap-free; what clients saw before the crash is a prefix; the
    # cut-off turn ends with an INTERRUPTED TurnFinished.
    replay, caught_up = await client.watch(sid, after=0)
    assert_gap_free(replay)
    assert caught_up == restored.last_sequence == replay[-1].sequence
    assert replay[: len(turn1) + len(turn2_seen)] == turn1 + turn2_seen
    assert kind(replay[-1]) == "turn_finished" and replay[-1].turn_id == turn2_id
    assert replay[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    assert [kind(e) for e in replay].count("turn_finished") == 2
    assert all(e.turn_id == turn2_id for e in replay[len(turn1) :])
    # The call cut off by the crash still got its one ToolCallFinished (cancelled, interrupted).
    turn2_events = replay[len(turn1) :]
    started = {e.tool_call_started.call.call_id for e in turn2_events if kind(e) == "tool_call_started"}
    finished = [e.tool_call_finished for e in turn2_events if kind(e) == "tool_call_finished"]
    assert started and started == {f.call_id for f in finished}
    assert all("interrupted" in f.result.output and f.result.is_error for f in finished)

    # The session works after the restart.
    turn3 = await client.send(sid, "try again")
    assert_gap_free(replay + turn3, 1)
    assert turn3[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    # The model saw the interrupted call in its history and goes on from there (its script's next
    # response), rather than starting the turn over.
    assert turn3[-1].turn_finished.final_text == "All done."
    assert not [e for e in turn3 if kind(e) == "tool_call_finished"]
    assert (await client.get(sid)).state == session_pb2.SESSION_STATE_IDLE


async def test_anthropic_provider_turn(processes: Processes, workspace: Path, tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        [
            {
                "text": "Let me check.",
                "tool_calls": [
                    call("grep", "toolu_grep", pattern="needle"),
                    call("read", "toolu_read", file_path="a.txt"),
                ],
            },
            {"text": "The file says old content."},
        ],
        name="anthropic.yaml",
    )
    runner, url = await start_mock_llm(script, host="127.0.0.1", port=0)
    try:
        env = {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "test"}
        server = await processes.start_server(tmp_path / "data", model="anthropic:mock", env=env)
        client = server.client
        await client.wait_workers(*WORKERS)
        session = await client.create(workspace, "anthropic:mock")
        events = await client.send(session.session_id, "what is in a.txt?")
        mock = runner.app[MOCK_LLM_KEY]
    finally:
        await runner.cleanup()

    assert_gap_free(events)
    assert kind(events[0]) == "turn_started"
    finished = events[-1].turn_finished
    assert finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert finished.final_text == "The file says old content."
    assert finished.model_requests == 2 and finished.tool_calls == 2
    assert finished.usage.input_tokens > 0 and finished.usage.output_tokens > 0
    started = _started(events)
    assert set(started) == {"toolu_grep", "toolu_read"}
    # The grep goes to a worker; the read of a small file is cheaper here (the default placement rule).
    assert started["toolu_grep"].worker_id in WORKERS and started["toolu_read"].worker_id == "local"
    results = {
        e.tool_call_finished.call_id: e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"
    }
    assert "old content" in results["toolu_read"].output and not results["toolu_grep"].is_error

    assert [r.path for r in mock.requests] == ["/v1/messages", "/v1/messages"]
    assert mock.requests[0].headers.get("x-api-key") == "test"
    second = mock.requests[1].body["messages"]
    results_block = [b["tool_use_id"] for b in second[-1]["content"] if b.get("type") == "tool_result"]
    assert results_block == ["toolu_grep", "toolu_read"]

    history = await client.history(session.session_id)
    assert [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL] == ["toolu_grep", "toolu_read"]
