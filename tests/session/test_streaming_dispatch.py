"""Leading Query calls start while the model is still streaming its response (mock LLM over HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from session_server.llm.script import Script
from session_server.mock_llm.server import start_mock_llm
from tests.session.conftest import call, kind, write_script

# Paced so that streaming the long last call (a few seconds at this rate) takes well over the
# time the queries need, even on a loaded machine.
TOKENS_PER_SECOND = 100
LONG_CONTENT = "word " * 40


@pytest.fixture
async def mock_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = write_script(tmp_path, [
        {"text": "Reading, then writing.", "tool_calls": [
            call("grep", pattern="needle", path="."),
            call("read", file_path="README.md"),
            call("write", file_path="out.txt", content=LONG_CONTENT),
        ]},
        {"text": "Done."},
    ], name="stream.yaml")
    runner, url = await start_mock_llm(Script.load(script), token_rate=TOKENS_PER_SECOND)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    yield
    await runner.cleanup()


async def test_leading_queries_run_before_the_response_has_finished_streaming(
    mock_llm, make_server, workspace: Path
) -> None:
    client = (await make_server()).client
    session = await client.create(workspace, "openai:mock")
    events = await client.send(session.session_id, "go", within=30)
    finished = {e.tool_call_finished.tool_name: e for e in events if kind(e) == "tool_call_finished"}
    started = {e.tool_call_started.call.tool_name: e for e in events if kind(e) == "tool_call_started"}
    assert set(finished) == {"grep", "read", "write"}
    assert not any(e.tool_call_finished.result.is_error for e in finished.values())
    # Both queries were done before the response was complete (ModelResponded, which the write
    # needs): they ran while the write's long arguments were still streaming. Told by the order
    # of the events, not by a gap in their times, which a loaded machine's pauses could shrink.
    responded = next(e for e in events if kind(e) == "model_responded")  # the first step's
    for query in ("grep", "read"):
        assert finished[query].sequence < responded.sequence < started["write"].sequence, query
    assert (workspace / "out.txt").read_text() == LONG_CONTENT
