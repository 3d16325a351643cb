"""Text that UTF-8 cannot carry: a model's JSON may hold lone surrogates ("\\ud800"), and file
names that are not UTF-8 reach tools' output. Protobuf and SQLite refuse such strings; the turn
must still end normally, with U+FFFD in their place, on a worker as in the server, and the
worker must keep serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codelane.v1 import events_pb2
from tests.session.conftest import call, kind

REPLACEMENT = "\ufffd"


def _script(tmp_path: Path) -> str:
    # Written with JSON escapes, as a model's API would send them: json.dumps keeps "\ud800" as
    # the six ASCII characters that Python decodes to a lone surrogate.
    responses = [
        {"text": "thinking \ud800 aloud", "tool_calls": [
            call("read", "c_read", file_path="missing-\udcff.txt"),
            call("glob", "c_glob", pattern="*.txt"),
            call("grep", "c_grep", pattern="needle", path="."),
            call("r\ud800ad", "c_bad_name"),
        ]},
        {"text": "done \udfff"},
        {"tool_calls": [call("read", "c_again", file_path="plain.txt")]},
        {"text": "still here"},
    ]
    path = tmp_path / "surrogates.json"
    path.write_text(json.dumps({"responses": responses}), encoding="ascii")
    return f"scripted:{path}"


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "on-a-worker"])
async def test_lone_surrogates_from_the_model_and_the_disk_never_break_a_turn(
    make_server, tmp_path: Path, workers: int
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "plain.txt").write_text("plain needle\n", encoding="utf-8")
    # A name that is not UTF-8: pathlib cannot spell it, so the bytes API writes it.
    fd = os.open(bytes(workspace) + b"/bad-\xff-name.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"needle in a badly named file\n")
    os.close(fd)
    # On a worker, the small read too (the server would read a small file itself).
    served = await make_server(local_workers=workers, local_cheap_calls=False)
    client = served.client
    if workers:
        await client.wait_workers("local-1")
    session = await client.create(workspace, _script(tmp_path))

    events = await client.send(session.session_id, "go")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    text = "".join(e.text_delta.text for e in events if kind(e) == "text_delta")
    assert text == f"thinking {REPLACEMENT} aloud" + f"done {REPLACEMENT}"
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result
               for e in events if kind(e) == "tool_call_finished"}
    assert results["c_read"].is_error and f"missing-{REPLACEMENT}.txt" in results["c_read"].output
    assert f"bad-{REPLACEMENT}-name.txt" in results["c_glob"].output
    assert f"bad-{REPLACEMENT}-name.txt" in results["c_grep"].output
    assert f"r{REPLACEMENT}ad" in results["c_bad_name"].output
    runs_on = "local-1" if workers else "local"
    assert {results[c].worker_id for c in ("c_read", "c_glob", "c_grep")} == {runs_on}

    # Stored as sent: the replay and the history hold the same text.
    replayed, _ = await client.watch(session.session_id)
    assert [e.sequence for e in replayed] == [e.sequence for e in events]
    history = await client.history(session.session_id)
    assert history[1].text == f"thinking {REPLACEMENT} aloud"
    assert any(f"missing-{REPLACEMENT}.txt" in m.tool_result.output for m in history)

    # The worker (or the server) still serves the next turn.
    again = await client.send(session.session_id, "again")
    assert again[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    (result,) = [e.tool_call_finished.result for e in again if kind(e) == "tool_call_finished"]
    assert not result.is_error and "plain needle" in result.output and result.worker_id == runs_on
