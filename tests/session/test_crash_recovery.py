"""A server killed with SIGKILL at bad moments, then restarted on the same data dir: every cut-off
turn ends as the protocol promises (its confirmations resolved, its external tasks completed, its
calls finished, one TurnFinished), the session is idle with a valid history, and its next turn runs.

Each test runs a real `codelane server` process on a loopback port (see `Processes`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.events import (
    CallInfo,
    ConfirmationRequired,
    ModelResponded,
    StoredEvent,
    ToolCallFinished,
    ToolCallStarted,
    TurnStarted,
)
from session_server.llm.base import Usage
from session_server.store import Store
from tests.polling import poll_until
from tests.session.conftest import Client, Processes, call, kind, read_until, scripted
from tool_worker.tools.base import ToolResult

INTERRUPTED = events_pb2.STOP_REASON_INTERRUPTED
CANCELLED = tools_pb2.ERROR_KIND_CANCELLED


async def _kill_when(server: Any, session_id: str, what: str) -> list[Any]:
    """Starts a turn, reads its stream until an event of kind `what`, kills the server (SIGKILL),
    and returns the events seen (each was stored before it was sent)."""
    stream = server.client.send_stream(session_id, "go")
    seen: list[Any] = []
    await read_until(stream, lambda r: kind(r.event) == what, seen)
    server.kill9()
    await _broken(stream)
    return [r.event for r in seen]


async def _broken(stream: Any) -> None:
    """Reads what the stream still holds until it breaks: its server is gone."""

    async def drain() -> None:
        while await stream.read() is not grpc.aio.EOF:
            pass

    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(drain(), 10)


async def _after_restart(client: Client, session_id: str, seen: list[events_pb2.Event]) -> list[events_pb2.Event]:
    """What every cut-off turn must look like after the restart; returns the replayed log."""
    session = await client.get(session_id)
    assert session.state == session_pb2.SESSION_STATE_IDLE
    replay, last = await client.watch(session_id)
    assert [e.sequence for e in replay] == list(range(1, last + 1))
    # Nothing a client saw is lost: every event sent before the kill is in the log, unchanged.
    stored = {e.sequence: e for e in replay}
    assert all(stored[e.sequence] == e for e in seen)
    finished = [e for e in replay if kind(e) == "turn_finished"]
    assert len(finished) == 1 and replay[-1] is finished[0]
    assert finished[0].turn_finished.stop_reason == INTERRUPTED
    assert kind(replay[0]) == "turn_started"
    return replay


async def _next_turn_runs(client: Client, session_id: str) -> None:
    """The session takes a new turn, and its history holds each call with one result."""
    events = await client.send(session_id, "again")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    history = await client.history(session_id)
    calls = [c.call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_ASSISTANT for c in m.tool_calls]
    results = [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL]
    assert calls == results


async def test_a_confirmation_pending_at_a_crash_is_resolved_as_cancelled(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    model = scripted(tmp_path, [
        {"text": "Writing.", "tool_calls": [call("write", "c_write", file_path="out.txt", content="x\n")]},
        {"text": "Done."},
    ])
    data_dir = tmp_path / "data"
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace, permissions=session_pb2.PermissionPolicy(ask=["write"]))
    seen = await _kill_when(server, session.session_id, "confirmation_required")

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay = await _after_restart(server.client, session.session_id, seen)
    kinds = [kind(e) for e in replay]
    # The protocol's promise: ConfirmationRequired is always followed by one ConfirmationResolved,
    # before the call's ToolCallFinished; a client replaying the log must not keep asking.
    assert kinds.count("confirmation_resolved") == 1
    resolved = replay[kinds.index("confirmation_resolved")].confirmation_resolved
    assert (resolved.call_id, resolved.outcome) == ("c_write", events_pb2.CONFIRMATION_OUTCOME_CANCELLED)
    assert kinds.index("confirmation_resolved") < kinds.index("tool_call_finished")
    assert not (workspace / "out.txt").exists()
    await _next_turn_runs(server.client, session.session_id)


async def test_an_external_task_claimed_at_a_crash_is_completed_as_withdrawn(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    model = scripted(tmp_path, [
        {"text": "Running.", "tool_calls": [call("bash", "c_ext", command="true")]},
        {"text": "Done."},
    ])
    data_dir = tmp_path / "data"
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    queue = session_pb2.QueueConfig(lanes=[
        session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE, mode=tools_pb2.LANE_MODE_EXTERNAL)
    ])
    session = await server.client.create(workspace, queue=queue)
    stream = server.client.send_stream(session.session_id, "go")
    seen: list[Any] = []
    await read_until(stream, lambda r: kind(r.event) == "external_task_pending", seen)
    claim = session_pb2.ClaimExternalTasksRequest(session_id=session.session_id, client_id="runner", max_tasks=1)
    [task] = (await server.client.sessions.ClaimExternalTasks(claim, timeout=10)).tasks
    # The claim's ToolCallStarted: the task is running in the client when the server dies.
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", seen)
    server.kill9()
    await _broken(stream)

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay = await _after_restart(server.client, session.session_id, [r.event for r in seen])
    kinds = [kind(e) for e in replay]
    # ExternalTaskPending is always followed by one ExternalTaskCompleted (per attempt offered),
    # before the call's ToolCallFinished: a client following the log sees the task withdrawn.
    completed = [e.external_task_completed for e in replay if kind(e) == "external_task_completed"]
    assert [c.task_id for c in completed] == [task.task_id]
    assert completed[0].result.is_error and completed[0].result.error_kind == CANCELLED
    assert kinds.index("external_task_completed") < kinds.index("tool_call_finished")
    # The client that held the lease learns the task is gone.
    request = session_pb2.CompleteExternalTaskRequest(
        session_id=session.session_id, task_id=task.task_id, client_id="runner", result=tools_pb2.ToolResult(output="x")
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.client.sessions.CompleteExternalTask(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    await _next_turn_runs(server.client, session.session_id)


async def _one_turn_then_killed(
    processes: Processes, workspace: Path, data_dir: Path, model: str
) -> tuple[Any, list[events_pb2.Event]]:
    """A server that ran one whole turn of a new session, then was killed (SIGKILL): the session
    and the turn's events."""
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    events = await server.client.send(session.session_id, "go")
    assert kind(events[-1]) == "turn_finished"
    server.kill9()
    return session, events


async def test_a_turn_whose_end_was_stored_is_not_ended_twice(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # The turn's TurnFinished is committed (group commit), then the session is marked idle in a
    # second transaction: a kill between the two leaves a finished turn marked running. That
    # window is microseconds wide, so the test leaves the state such a kill leaves on disk.
    model = scripted(tmp_path, [{"text": "Done."}, {"text": "Done again."}])
    data_dir = tmp_path / "data"
    session, events = await _one_turn_then_killed(processes, workspace, data_dir, model)
    with sqlite3.connect(data_dir / "codelane.db") as db:
        db.execute("UPDATE sessions SET state = 'running', current_turn_id = ? WHERE session_id = ?",
                   (events[-1].turn_id, session.session_id))
    db.close()

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    assert (await server.client.get(session.session_id)).state == session_pb2.SESSION_STATE_IDLE
    replay, _ = await server.client.watch(session.session_id)
    finished = [e.turn_finished for e in replay if kind(e) == "turn_finished"]
    assert len(finished) == 1 and finished[0].stop_reason == events_pb2.STOP_REASON_END_TURN
    await _next_turn_runs(server.client, session.session_id)


async def _created_then_killed(processes: Processes, workspace: Path, data_dir: Path, model: str) -> Any:
    """A session, created and left by a server killed at once: its store is the test's to shape."""
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    server.kill9()
    return session


async def test_a_turn_cut_off_before_its_first_event_still_starts_and_ends(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # A turn is marked running (its own commit), then its TurnStarted waits for the next group
    # commit: a kill in between leaves a running turn without one event. Left on disk by hand.
    model = scripted(tmp_path, [{"text": "Done."}])
    data_dir = tmp_path / "data"
    session = await _created_then_killed(processes, workspace, data_dir, model)
    with sqlite3.connect(data_dir / "codelane.db") as db:
        db.execute("UPDATE sessions SET state = 'running', current_turn_id = 't_cut' WHERE session_id = ?",
                   (session.session_id,))
    db.close()

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay = await _after_restart(server.client, session.session_id, [])
    assert [(kind(e), e.turn_id) for e in replay] == [("turn_started", "t_cut"), ("turn_finished", "t_cut")]
    await _next_turn_runs(server.client, session.session_id)


async def test_an_early_call_asking_for_confirmation_at_a_crash_still_finishes(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # An early Query call (run as soon as its arguments streamed) asks before its response's
    # ModelResponded is stored: a crash then left its ConfirmationRequired the only event naming
    # it, and the restart resolved the confirmation but gave the call no ToolCallFinished.
    model = scripted(tmp_path, [{"text": "Done."}])
    data_dir = tmp_path / "data"
    session = await _created_then_killed(processes, workspace, data_dir, model)
    early = CallInfo("c_early", "read", '{"file_path": "a.txt"}', "query", 0)
    store = Store(data_dir / "codelane.db")
    store.set_session_state(session.session_id, "running", "t_cut")
    store.append_events([StoredEvent(session.session_id, 1, 1.0, "t_cut", TurnStarted("go")),
                         StoredEvent(session.session_id, 2, 2.0, "t_cut", ConfirmationRequired(early, 60.0))])
    store.close()

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay = await _after_restart(server.client, session.session_id, [])
    assert [kind(e) for e in replay] == ["turn_started", "confirmation_required", "confirmation_resolved",
                                         "tool_call_finished", "turn_finished"]
    finished = replay[3].tool_call_finished
    assert finished.call_id == "c_early" and finished.result.error_kind == CANCELLED
    await _next_turn_runs(server.client, session.session_id)


async def test_an_early_call_that_finished_before_its_response_is_not_finished_again(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # An early Query call (run as soon as its arguments streamed) often finishes before its
    # response's ModelResponded, which names it again; a crash later in the step (here while a bash
    # runs) then had the restart give the read a second ToolCallFinished, "interrupted", and record
    # that in the history in place of what the read returned. Left on disk by hand: whether the read
    # ends before ModelResponded is up to the scheduler.
    model = scripted(tmp_path, [{"text": "Done."}])
    data_dir = tmp_path / "data"
    session = await _created_then_killed(processes, workspace, data_dir, model)
    early = CallInfo("c_early", "read", '{"file_path": "a.txt"}', "query", 0)
    slow = CallInfo("c_slow", "bash", '{"command": "sleep 1000"}', "execute", 1)
    store = Store(data_dir / "codelane.db")
    store.set_session_state(session.session_id, "running", "t_cut")
    store.append_events([
        StoredEvent(session.session_id, 1, 1.0, "t_cut", TurnStarted("go")),
        StoredEvent(session.session_id, 2, 2.0, "t_cut", ToolCallStarted(early, "query", "local", 1)),
        StoredEvent(session.session_id, 3, 3.0, "t_cut", ToolCallFinished(
            "c_early", "read", ToolResult(output="     1\told content"), 0.0, 0.0)),
        StoredEvent(session.session_id, 4, 4.0, "t_cut", ModelResponded(0, [early, slow], Usage(), "tool_use")),
        StoredEvent(session.session_id, 5, 5.0, "t_cut", ToolCallStarted(slow, "execute", "local", 1)),
    ])
    store.close()

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay = await _after_restart(server.client, session.session_id, [])
    finished = [e.tool_call_finished for e in replay if kind(e) == "tool_call_finished"]
    assert [f.call_id for f in finished] == ["c_early", "c_slow"]
    assert finished[1].result.error_kind == CANCELLED
    history = await server.client.history(session.session_id)
    results = {m.tool_call_id: m.tool_result for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL}
    assert not results["c_early"].is_error and "old content" in results["c_early"].output
    assert results["c_slow"].error_kind == CANCELLED
    await _next_turn_runs(server.client, session.session_id)


async def test_the_history_keeps_the_step_a_crash_cut_off(
    processes: Processes, workspace: Path, tmp_path: Path, mark: str
) -> None:
    # A write runs and finishes, then a bash is still running when the server dies. The write's
    # effect is on disk: the next turn's model must see that step (as after a CancelTurn), not a
    # history that ends with the user's message, or it does the work again.
    model = scripted(tmp_path, [
        {"text": "Writing, then a slow command.", "tool_calls": [
            call("write", "c_write", file_path="b.txt", content="b\n"),
            call("bash", "c_slow", command=f"echo $$ > slow.pid; sleep {mark}"),
        ]},
        {"text": "Done."},
    ])
    data_dir = tmp_path / "data"
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    stream = server.client.send_stream(session.session_id, "go")
    seen: list[Any] = []
    await read_until(stream, lambda r: kind(r.event) == "tool_call_finished", seen)
    pid_file = workspace / "slow.pid"
    await poll_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", what="the bash to start")
    server.kill9()
    processes.kill_pid_file(pid_file)
    await _broken(stream)

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    await _after_restart(server.client, session.session_id, [r.event for r in seen])
    history = await server.client.history(session.session_id)
    assert [m.role for m in history] == [session_pb2.MESSAGE_ROLE_USER, session_pb2.MESSAGE_ROLE_ASSISTANT,
                                         session_pb2.MESSAGE_ROLE_TOOL, session_pb2.MESSAGE_ROLE_TOOL]
    assert history[1].text == "Writing, then a slow command."
    assert [c.call_id for c in history[1].tool_calls] == ["c_write", "c_slow"]
    assert [m.tool_call_id for m in history[2:]] == ["c_write", "c_slow"]
    assert not history[2].tool_result.is_error
    assert history[3].tool_result.error_kind == CANCELLED and "interrupted" in history[3].tool_result.output
    await _next_turn_runs(server.client, session.session_id)
    assert (workspace / "b.txt").read_text() == "b\n"


@pytest.mark.parametrize("after", [2, 25, 60])
async def test_no_event_a_client_saw_is_lost_to_a_kill(
    processes: Processes, workspace: Path, tmp_path: Path, after: int
) -> None:
    # Group commit: events are sent only once their batch is committed. A watcher follows a busy
    # turn (reads, greps, steps) and the server is killed after it saw `after` events. The turn
    # ends in a command that outlasts the test, so it is still running at the kill however far
    # behind the watcher reads (on a loaded machine the whole turn once ended before it saw 60).
    step = {"text": "Looking.", "tool_calls": [
        call("read" if i % 2 else "grep", **({"file_path": "a.txt"} if i % 2 else {"pattern": "needle"}))
        for i in range(12)
    ]}
    waiting = {"text": "Waiting.", "tool_calls": [call("bash", command="sleep 1000")]}
    model = scripted(tmp_path, [step, step, step, step, waiting, {"text": "Done."}])
    data_dir = tmp_path / "data"
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    watcher = server.client.watch_stream(session.session_id, follow=True)
    seen: list[Any] = []
    await read_until(watcher, lambda r: r.HasField("caught_up"), seen)
    turn = server.client.send_stream(session.session_id, "go")
    await read_until(watcher, lambda r: r.HasField("event") and r.event.sequence >= after, seen)
    server.kill9()
    await _broken(watcher)
    await _broken(turn)
    events = [r.event for r in seen if r.HasField("event")]

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay, last = await server.client.watch(session.session_id)
    assert [e.sequence for e in replay] == list(range(1, last + 1))
    assert replay[: len(events)] == events
    assert [kind(e) for e in replay].count("turn_finished") == 1 and kind(replay[-1]) == "turn_finished"
    assert (await server.client.get(session.session_id)).state == session_pb2.SESSION_STATE_IDLE


def _absurd_durations(value: Any) -> Any:
    """`value` (parsed JSON) with every run_time and queue_wait at 2^63 s."""
    if isinstance(value, dict):
        return {k: 2.0**63 if k in ("run_time", "queue_wait") else _absurd_durations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_absurd_durations(v) for v in value]
    return value


async def test_a_session_stored_with_durations_no_duration_can_carry_stays_readable(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # Servers before durations were checked where they arrive stored a worker's run_time of
    # 2^63 s as it came; such a session failed every replay and history read after the upgrade.
    model = scripted(tmp_path, [{"tool_calls": [call("read", "c_read", file_path="a.txt")]}, {"text": "Done."}])
    data_dir = tmp_path / "data"
    session, events = await _one_turn_then_killed(processes, workspace, data_dir, model)
    with sqlite3.connect(data_dir / "codelane.db") as db:
        rows = db.execute("SELECT sequence, payload_json FROM events WHERE kind = 'tool_call_finished'").fetchall()
        assert rows
        for sequence, payload in rows:
            db.execute("UPDATE events SET payload_json = ? WHERE session_id = ? AND sequence = ?",
                       (json.dumps(_absurd_durations(json.loads(payload))), session.session_id, sequence))
        results = db.execute("SELECT idx, tool_result_json FROM messages WHERE tool_result_json IS NOT NULL").fetchall()
        assert results
        for idx, result in results:
            db.execute("UPDATE messages SET tool_result_json = ? WHERE session_id = ? AND idx = ?",
                       (json.dumps(_absurd_durations(json.loads(result))), session.session_id, idx))
    db.close()

    server = await processes.start_server(data_dir, model=model, local_workers=0)
    replay, last = await server.client.watch(session.session_id)
    assert last == events[-1].sequence
    [finished] = [e.tool_call_finished for e in replay if kind(e) == "tool_call_finished"]
    assert finished.run_time.seconds == 0 and finished.queue_wait.seconds == 0  # not measured
    assert "old content" in finished.result.output
    history = await server.client.history(session.session_id)
    assert [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL] == ["c_read"]
