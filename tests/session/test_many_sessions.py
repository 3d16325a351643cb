"""Sessions that share a server never see each other's calls: 50 sessions replay one script (so
every call id repeats 50 times), 3 turns each of 8 Query calls and 1 Execute call, on 2 real
worker processes. Every call gets its own result: each session reads files that only its own
workspace holds, so a result crossing sessions would show."""

from __future__ import annotations

import asyncio
from pathlib import Path

from codelane.v1 import events_pb2, session_pb2
from session_server import snapshots
from tests.session.conftest import RPC_TIMEOUT, call, collect, kind, read_until, scripted

SESSIONS = 50
TURNS = 3
QUERIES = 8


def _script_responses() -> list[dict]:
    responses = []
    for turn in range(TURNS):
        # Ids unique within a session (a repeat would get one of the server's), repeated across
        # all fifty sessions.
        calls = [call("read", f"read_{turn}_{i}", file_path=f"f{i}.txt") for i in range(QUERIES)]
        calls.append(call("write", f"write_{turn}", file_path=f"turn-{turn}.txt", content=f"turn {turn}\n"))
        responses += [{"text": f"Turn {turn}.", "tool_calls": calls}, {"text": f"Turn {turn} done."}]
    return responses


async def test_fifty_sessions_replaying_one_script_each_get_their_own_results(make_server, tmp_path: Path) -> None:
    server = await make_server(local_workers=2, local_fallback=False)
    client = server.client
    await client.wait_workers("local-1", "local-2")
    model = scripted(tmp_path, _script_responses())
    workspaces = []
    for k in range(SESSIONS):
        root = tmp_path / f"ws{k}"
        root.mkdir()
        for i in range(QUERIES):
            (root / f"f{i}.txt").write_text(f"session {k} file {i}\n")
        workspaces.append(root)
    sessions = [await client.create(root, model) for root in workspaces]

    async def run(k: int) -> list:
        results = []
        for turn in range(TURNS):
            events = await client.send(sessions[k].session_id, f"turn {turn}", within=120)
            assert kind(events[-1]) == "turn_finished", events[-1]
            errors = [e.error for e in events if kind(e) == "error"]
            # One line, errors first: a CI summary shows only the first line of a failure.
            assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN, (
                f"session {k} turn {turn} ended with errors {[(e.reason, e.message) for e in errors]}")
            results.append([e.tool_call_finished for e in events if kind(e) == "tool_call_finished"])
        return results

    everything = await asyncio.gather(*(run(k) for k in range(SESSIONS)))

    for k, turns in enumerate(everything):
        for turn, finished in enumerate(turns):
            assert len(finished) == QUERIES + 1, f"session {k} turn {turn}: {len(finished)} results"
            by_id = {f.call_id: f.result for f in finished}
            for i in range(QUERIES):
                result = by_id[f"read_{turn}_{i}"]
                assert not result.is_error, f"session {k} turn {turn} read_{i}: {result.output}"
                assert f"session {k} file {i}" in result.output, f"session {k} got {result.output!r}"
                assert result.worker_id in {"local-1", "local-2"}
            assert not by_id[f"write_{turn}"].is_error
        assert sorted(p.name for p in workspaces[k].glob("turn-*.txt")) == [f"turn-{t}.txt" for t in range(TURNS)]


async def test_a_turn_keeps_its_workspace_snapshots_while_more_workspaces_than_kept_start_turns(
    make_server, workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    # Two kept instead of 64: the turn waits on a confirmation while two other workspaces run
    # turns; its next step's Query calls are then snapshotted for a worker as before.
    monkeypatch.setattr(snapshots, "MAX_WORKSPACES", 2)
    server = await make_server(local_workers=1, local_fallback=False)
    client = server.client
    await client.wait_workers("local-1")
    model = scripted(tmp_path, [
        {"tool_calls": [call("bash", "c_bash", command="true")]},
        {"tool_calls": [call("list_files", "c_list"), call("grep", "c_grep", pattern="needle")]},
        {"text": "done"},
    ], "held.yaml")
    held = await client.create(workspace, model, permissions=session_pb2.PermissionPolicy(ask=["bash"]))
    stream = client.send_stream(held.session_id, "go")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    quick = scripted(tmp_path, [{"text": "hi"}], "quick.yaml")
    for name in ("other-1", "other-2"):
        (tmp_path / name).mkdir()
        other = await client.create(tmp_path / name, quick)
        await client.send(other.session_id, "hi")
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=held.session_id, call_id="c_bash", approve=True),
        timeout=RPC_TIMEOUT)
    events = [r.event for r in seen + await collect(stream)]
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result
                for e in events if kind(e) == "tool_call_finished"}
    assert not finished["c_list"].is_error and "src/alpha.py" in finished["c_list"].output, finished["c_list"]
    assert not finished["c_grep"].is_error and finished["c_grep"].worker_id == "local-1", finished["c_grep"]
