"""Every turn ends with TurnFinished, whatever the model's server sends: malformed chunks and
token counts of the wrong type, over HTTP from the mock LLM, in both wire formats. Nothing is
left running, and the history stays valid (the mock refuses a history with an unanswered call,
so the next turn succeeding proves it). Any other exception in a turn: tests/server/test_agent.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from codelane.v1 import events_pb2
from session_server.llm.script import Script
from tests.session.conftest import call, kind, mock_llm, write_script


@pytest.fixture
def script(tmp_path: Path) -> Script:
    path = write_script(tmp_path, [
        {"text": "Looking.", "tool_calls": [call("grep", pattern="needle", path="."), call("read", file_path="a.txt")]},
        {"text": "Done."},
    ], name="faulty.yaml")
    return Script.load(path)


@pytest.fixture
async def mock_url(script: Script, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    async with mock_llm(monkeypatch, script, fault=request.param, fault_count=1) as mock:
        yield mock


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("mock_url", ["malformed_chunk"], indirect=True)
async def test_a_malformed_chunk_ends_the_turn_with_an_error_and_stops_its_calls(
    mock_url, make_server, workspace: Path, provider: str
) -> None:
    client = (await make_server()).client
    session = await client.create(workspace, f"{provider}:mock")

    events = await client.send(session.session_id, "go", within=20)
    finished = events[-1]
    assert kind(finished) == "turn_finished"
    assert finished.turn_finished.stop_reason == events_pb2.STOP_REASON_ERROR
    [error] = [e for e in events if kind(e) == "error"]
    assert error.error.fatal and error.error.reason == "STREAM_ERROR" and "wrong shape" in error.error.message
    started = {e.tool_call_started.call.call_id for e in events if kind(e) == "tool_call_started"}
    ended = {e.tool_call_finished.call_id for e in events if kind(e) == "tool_call_finished"}
    assert started <= ended  # early-started calls were stopped and answered

    await _next_turn_runs(client, session.session_id)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("mock_url", ["string_usage"], indirect=True)
async def test_token_counts_sent_as_strings_are_read_as_counts(
    mock_url, make_server, workspace: Path, provider: str
) -> None:
    client = (await make_server()).client
    session = await client.create(workspace, f"{provider}:mock")
    events = await client.send(session.session_id, "go", within=20)
    finished = events[-1].turn_finished
    assert finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert finished.usage.input_tokens > 0 and finished.usage.output_tokens > 0
    await _next_turn_runs(client, session.session_id)


async def _next_turn_runs(client, session_id: str) -> None:
    """The fault hit the first request only: the next turn runs on a valid history."""
    again = await client.send(session_id, "try again", within=20)
    assert again[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert not any(e.tool_call_finished.result.is_error for e in again if kind(e) == "tool_call_finished")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_call_cut_off_by_the_token_limit_is_not_run(
    make_server, workspace: Path, tmp_path: Path, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model reached its output token limit right after a call's name: the call, whose
    arguments never came, is answered with an error saying so, not run with empty arguments
    (`ls` needs none, and ran on the workspace root)."""
    path = write_script(tmp_path, [
        {"text": "Looking.", "tool_calls": [call("grep", pattern="needle", path="."), call("ls", path="sub")]},
        {"text": "Done."},
    ], name="cut.yaml")
    async with mock_llm(monkeypatch, path, fault="max_tokens", fault_count=1):
        client = (await make_server()).client
        session = await client.create(workspace, f"{provider}:mock")
        events = await client.send(session.session_id, "go", within=20)
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    [responded, _] = [e.model_responded for e in events if kind(e) == "model_responded"]
    assert responded.stop_reason == "max_tokens" and [c.tool_name for c in responded.tool_calls] == ["grep", "ls"]
    results = {e.tool_call_finished.tool_name: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert not results["grep"].is_error
    assert results["ls"].is_error and "cut off (by its token limit" in results["ls"].output
    assert not any(e.tool_call_started.call.tool_name == "ls" for e in events if kind(e) == "tool_call_started")
