"""Turns with the scripted model: order-preserving scheduling, one turn at a time, disconnecting
clients, and cancellation in the middle of a batch of calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.admission import Limits
from tests.polling import poll_until
from tests.processes import all_gone, pids_with
from tests.session.conftest import (
    Client,
    ErrorDetails,
    InProcess,
    assert_gap_free,
    call,
    error_details,
    kind,
    mock_llm,
    read_rest,
    read_until,
    rpc_error,
    scripted,
    write_script,
)

QUERY, EXECUTE = tools_pb2.LANE_QUERY, tools_pb2.LANE_EXECUTE
# Sessions deleted while messages are sent to them, and the clients sending: enough that a
# message lands in the moment between the end of the turn and the deletion (5 in 30 rounds did).
DELETE_RACE_ROUNDS = 30
DELETE_RACE_SENDERS = 16


def _by_call(events: list[events_pb2.Event], event_kind: str) -> dict[str, events_pb2.Event]:
    found: dict[str, events_pb2.Event] = {}
    for e in events:
        if kind(e) != event_kind:
            continue
        call_id = (
            e.tool_call_started.call.call_id if event_kind == "tool_call_started" else e.tool_call_finished.call_id
        )
        assert call_id not in found, f"two {event_kind} events for {call_id}"
        found[call_id] = e
    return found


def _assert_valid_history(history: list[session_pb2.Message]) -> None:
    """Every assistant call is answered by one tool message, right after it, in call order."""
    i = 0
    while i < len(history):
        message = history[i]
        assert message.index == i + 1
        i += 1
        if message.role == session_pb2.MESSAGE_ROLE_ASSISTANT and message.tool_calls:
            answers = history[i : i + len(message.tool_calls)]
            assert [m.role for m in answers] == [session_pb2.MESSAGE_ROLE_TOOL] * len(message.tool_calls)
            assert [m.tool_call_id for m in answers] == [c.call_id for c in message.tool_calls]
            i += len(message.tool_calls)
        else:
            assert message.role != session_pb2.MESSAGE_ROLE_TOOL, f"stray tool message at {message.index}"


async def test_mixed_batch_runs_in_model_order(client: Client, workspace: Path, tmp_path: Path) -> None:
    calls = [
        call("grep", "c0_grep", pattern="needle"),
        call("read", "c1_read_old", file_path="a.txt"),
        call("glob", "c2_glob", pattern="**/*.py"),
        call("edit", "c3_edit", file_path="a.txt", old_string="old content", new_string="new content"),
        call("read", "c4_read_new", file_path="a.txt"),
        call("write", "c5_write", file_path="notes/b.txt", content="written by the model\n"),
        call("read", "c6_read_written", file_path="notes/b.txt"),
        call("grep", "c7_grep_written", pattern="written by", path="notes"),
        call("ls", "c8_ls", path="."),
    ]
    model = scripted(tmp_path, [{"text": "Let me look around first.", "tool_calls": calls}, {"text": "All done."}])
    session = await client.create(workspace, model)

    events = await client.send(session.session_id, "Please update a.txt")

    # Order of the stream: TurnStarted first, TurnFinished last, sequences 1..N gap-free.
    assert_gap_free(events)
    assert kind(events[0]) == "turn_started" and events[0].turn_started.user_text == "Please update a.txt"
    assert kind(events[-1]) == "turn_finished"
    assert [kind(e) for e in events].count("turn_finished") == 1
    finished = events[-1].turn_finished
    assert finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert finished.model_requests == 2 and finished.tool_calls == len(calls)
    assert finished.final_text == "All done."
    turn_id = events[0].turn_id
    assert turn_id and all(e.turn_id == turn_id and e.session_id == session.session_id for e in events)
    text = "".join(e.text_delta.text for e in events if kind(e) == "text_delta" and e.text_delta.step == 0)
    assert text == "Let me look around first."

    # Every call started once and finished exactly once; lanes as their specs say.
    ids = [c["id"] for c in calls]
    started, done = _by_call(events, "tool_call_started"), _by_call(events, "tool_call_finished")
    assert set(started) == set(done) == set(ids)
    for call_id, event in started.items():
        assert event.tool_call_started.lane == (EXECUTE if call_id in ("c3_edit", "c5_write") else QUERY)
        assert event.tool_call_started.worker_id == "local"
        assert event.tool_call_started.attempt == 1
        assert started[call_id].sequence < done[call_id].sequence
    assert not any(d.tool_call_finished.result.is_error for d in done.values()), [
        d.tool_call_finished.result.output for d in done.values() if d.tool_call_finished.result.is_error
    ]

    # Order-preserving: a call starts after every earlier call that touches what it touches has
    # finished (the grep of "." and the read of a.txt before the edit of a.txt; the read, grep
    # and ls that see notes/b.txt after its write), and Execute calls run one at a time, in order.
    def after(later: str, earlier: str) -> bool:
        return started[later].sequence > done[earlier].sequence

    for earlier in ("c0_grep", "c1_read_old"):
        assert after("c3_edit", earlier)
    assert after("c4_read_new", "c3_edit") and after("c5_write", "c3_edit")
    for later in ("c6_read_written", "c7_grep_written", "c8_ls"):
        assert after(later, "c5_write")
    outputs = {call_id: event.tool_call_finished.result.output for call_id, event in done.items()}
    assert "old content" in outputs["c1_read_old"] and "new content" in outputs["c4_read_new"]
    assert "written by the model" in outputs["c6_read_written"] and "b.txt" in outputs["c7_grep_written"]

    # The model's response is announced with its calls, in model order.
    responded = [e.model_responded for e in events if kind(e) == "model_responded"]
    assert [[c.call_id for c in r.tool_calls] for r in responded] == [ids, []]
    assert [c.index for c in responded[0].tool_calls] == list(range(len(calls)))

    # History: user, assistant with the calls, their results in model order, final assistant.
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert [m.role for m in history] == [
        session_pb2.MESSAGE_ROLE_USER,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        *[session_pb2.MESSAGE_ROLE_TOOL] * len(calls),
        session_pb2.MESSAGE_ROLE_ASSISTANT,
    ]
    assert history[0].text == "Please update a.txt"
    assert history[1].text == "Let me look around first."
    assert [c.call_id for c in history[1].tool_calls] == ids
    assert [c.tool_name for c in history[1].tool_calls] == [c["name"] for c in calls]
    assert [json.loads(c.arguments_json) for c in history[1].tool_calls] == [c["arguments"] for c in calls]
    results = {m.tool_call_id: m.tool_result for m in history[2:-1]}
    assert [m.tool_call_id for m in history[2:-1]] == ids
    assert history[-1].text == "All done."
    assert all(m.turn_id == turn_id for m in history)

    # Results match what each call saw: old content before the edit, new after, and the write.
    assert "old content" in results["c1_read_old"].output
    assert "new content" in results["c4_read_new"].output and "old content" not in results["c4_read_new"].output
    assert "written by the model" in results["c6_read_written"].output
    assert "b.txt" in results["c7_grep_written"].output
    assert "alpha.py" in results["c0_grep"].output and "alpha.py" in results["c2_glob"].output
    assert (workspace / "a.txt").read_text() == "new content\n"
    # Events carry the same results as the history.
    for call_id, event in done.items():
        assert event.tool_call_finished.result.output == results[call_id].output

    session = await client.get(session.session_id)
    assert session.state == session_pb2.SESSION_STATE_IDLE
    assert session.last_sequence == events[-1].sequence
    assert session.message_count == len(history)


async def test_bad_calls_get_error_results_without_disturbing_siblings(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    calls = [
        call("read", "ok_1", file_path="README.md"),
        call("no_such_tool", "unknown"),
        {"name": "read", "id": "bad_json", "arguments_raw": '{"file_path": '},
        # Deeper than Python's JSON parser goes (it raises RecursionError, not a decode error).
        {"name": "read", "id": "too_deep", "arguments_raw": '{"file_path": ' + "[" * 100_000 + "]" * 100_000 + "}"},
        # Longer than Python reads an integer (it raises ValueError, not a decode error).
        {"name": "read", "id": "huge_int", "arguments_raw": '{"file_path": "a.txt", "offset": ' + "1" * 5000 + "}"},
        call("read", "missing_file", file_path="nope.txt"),
        call("read", "ok_2", file_path="src/beta.py"),
    ]
    model = scripted(tmp_path, [{"tool_calls": calls}, {"text": "ok"}])
    session = await client.create(workspace, model)
    events = await client.send(session.session_id, "go")
    done = _by_call(events, "tool_call_finished")
    assert set(done) == {c["id"] for c in calls}
    kinds = {cid: e.tool_call_finished.result.error_kind for cid, e in done.items()}
    assert kinds["ok_1"] == kinds["ok_2"] == tools_pb2.ERROR_KIND_UNSPECIFIED
    assert kinds["unknown"] == tools_pb2.ERROR_KIND_UNKNOWN_TOOL
    assert kinds["bad_json"] == kinds["too_deep"] == kinds["huge_int"] == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "nested too deeply" in done["too_deep"].tool_call_finished.result.output
    assert "an integer of more than 4,300 digits" in done["huge_int"].tool_call_finished.result.output
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert done["missing_file"].tool_call_finished.result.is_error
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL] == [c["id"] for c in calls]


async def test_one_turn_at_a_time(client: Client, workspace: Path, tmp_path: Path, mark: str) -> None:
    # The sleep never ends on its own: the turn runs until the test cancels it, however slow the machine.
    model = scripted(tmp_path, [{"text": "Waiting.", "tool_calls": [call("bash", command=f"sleep {mark}")]},
                                {"text": "ok"}])
    session = await client.create(workspace, model)
    other = await client.create(workspace, scripted(tmp_path, [{"text": "quick"}], name="quick.yaml"))

    stream = client.send_stream(session.session_id, "first")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", seen)
    assert (await client.get(session.session_id)).state == session_pb2.SESSION_STATE_RUNNING

    error = await rpc_error(client.send(session.session_id, "second"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "TURN_IN_PROGRESS"
    assert error.metadata == {"session_id": session.session_id}

    # Another session is not held back by this one.
    other_events = await client.send(other.session_id, "in parallel", within=10)
    assert kind(other_events[-1]) == "turn_finished"

    assert await client.cancel(session.session_id)
    rest = await read_rest(stream)
    assert kind(rest[-1].event) == "turn_finished"
    assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
    await client.wait_idle(session.session_id)
    # The refused message left no trace: one user message, one turn.
    history = await client.history(session.session_id)
    assert [m.text for m in history if m.role == session_pb2.MESSAGE_ROLE_USER] == ["first"]


async def test_turn_survives_client_disconnect(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    # The call runs until the test lets it go, so the turn is running for as long as it takes the
    # server to notice the client went away, however slow the machine.
    held = "until [ -e go ]; do sleep 0.01; done; echo slept"
    model = scripted(
        tmp_path,
        [
            {"text": "Working on it.", "tool_calls": [call("bash", "slow", command=held)]},
            {"text": "Finished without you."},
        ],
    )
    session = await client.create(workspace, model)

    stream = client.send_stream(session.session_id, "do it")
    first = await asyncio.wait_for(stream.read(), 10)
    assert kind(first.event) == "turn_started"
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", [])
    stream.cancel()
    # The turn's stream is the session's only subscriber: it is gone once the server saw the cancel.
    await poll_until(lambda: server.server.sessions.bus.subscribers() == 0, what="the server to drop the stream")
    assert (await client.get(session.session_id)).state == session_pb2.SESSION_STATE_RUNNING

    watch = client.watch_stream(session.session_id, after=0, follow=True)
    items: list = []
    try:
        # Caught up before the call is let go: a turn that ended first (the server slow to start
        # the watch) had its end in the replay, before the caught_up this test counts.
        await read_until(watch, lambda r: r.HasField("caught_up"), items)
        (workspace / "go").touch()
        last = await read_until(watch, lambda r: r.HasField("event") and kind(r.event) == "turn_finished", items)
    finally:
        watch.cancel()
    assert last.event.turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert last.event.turn_finished.final_text == "Finished without you."
    events = [i.event for i in items if i.HasField("event")]
    assert_gap_free(events)
    assert events[0] == first.event
    assert sum(1 for i in items if i.HasField("caught_up")) == 1
    done = _by_call(events, "tool_call_finished")
    assert done["slow"].tool_call_finished.result.output == "slept"

    idle = await client.wait_idle(session.session_id)
    assert idle.last_sequence == events[-1].sequence
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert history[-1].text == "Finished without you."


async def test_a_session_reads_idle_only_once_its_turns_events_are_stored(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # Events are committed in a group at the end of a loop turn; the session must not read as
    # idle before that commit, or a client that saw it idle gets a last_sequence without the
    # turn's last events (a replay up to it misses TurnFinished). Recorded after every write
    # that may change the state, so the check does not depend on when a client happens to poll.
    server: InProcess = await make_server()
    store = server.server.sessions.store
    stored_when_idle: list[int] = []

    def recording(write):
        def recorded(*args, **kwargs):
            result = write(*args, **kwargs)
            for record in store.list_sessions()[0]:
                if record.state == "idle" and record.last_sequence:
                    stored_when_idle.append(record.last_sequence)
            return result
        return recorded

    store.set_session_state = recording(store.set_session_state)
    store.append_events = recording(store.append_events)
    model = scripted(tmp_path, [{"text": "reading", "tool_calls": [call("read", file_path="a.txt")]},
                                {"text": "done"}])
    session = await server.client.create(workspace, model)
    events = await server.client.send(session.session_id, "go")
    assert kind(events[-1]) == "turn_finished"
    assert stored_when_idle and set(stored_when_idle) == {events[-1].sequence}


async def test_cancel_turn_records_the_clients_reason_in_the_log(
    client: Client, workspace: Path, tmp_path: Path, caplog
) -> None:
    # CancelTurnRequest.reason is "why, for the record": the server dropped it unread.
    caplog.set_level(logging.INFO, logger="codelane.sessions")
    # The call waits for a confirmation no one gives: the turn runs until the cancel.
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "b1", command="true")]}, {"text": "ok"}])
    session = await client.create(workspace, model, permissions=session_pb2.PermissionPolicy(ask=["bash"]))
    stream = client.send_stream(session.session_id, "go")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)

    reply = await client.sessions.CancelTurn(
        session_pb2.CancelTurnRequest(session_id=session.session_id, reason="the user pressed Ctrl-C"))
    assert reply.cancelled
    rest = await read_rest(stream)
    assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
    turn_id = rest[-1].event.turn_id
    logged = [r.getMessage() for r in caplog.records if r.name == "codelane.sessions"]
    assert f"session {session.session_id}: turn {turn_id} cancelled by a client: the user pressed Ctrl-C" in logged


async def test_cancel_mid_batch(client: Client, workspace: Path, tmp_path: Path, mark: str) -> None:
    bash = f"sleep {mark} & setsid sleep {mark} & wait"
    calls = [
        call("grep", "q1", pattern="needle"),
        call("read", "q2", file_path="a.txt"),
        call("bash", "long", command=bash),
        call("read", "q3", file_path="README.md"),
        call("grep", "q4", pattern="alpha"),
    ]
    model = scripted(tmp_path, [{"text": "Running.", "tool_calls": calls}, {"text": "Next turn."}])
    session = await client.create(workspace, model)
    assert not await client.cancel(session.session_id)  # idle: nothing to cancel

    stream = client.send_stream(session.session_id, "run the long thing")
    seen: list = []
    await read_until(
        stream,
        lambda r: kind(r.event) == "tool_call_started" and r.event.tool_call_started.call.call_id == "long",
        seen,
    )
    await poll_until(lambda: len(pids_with(mark)) == 2, what="both sleeps to start")

    assert await client.cancel(session.session_id)
    # The sleeps never end on their own: the stream ends only because the cancel ended the turn.
    rest = [r.event for r in await read_rest(stream)]
    events = [r.event for r in seen] + rest

    assert_gap_free(events)
    assert kind(events[-1]) == "turn_finished"
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
    finished = Counter(e.tool_call_finished.call_id for e in events if kind(e) == "tool_call_finished")
    assert finished == Counter({c["id"]: 1 for c in calls})
    results = {
        e.tool_call_finished.call_id: e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"
    }
    assert not results["q1"].is_error and not results["q2"].is_error
    for call_id in ("long", "q3", "q4"):
        assert results[call_id].error_kind == tools_pb2.ERROR_KIND_CANCELLED, call_id
    assert "while running" in results["long"].output and "before it started" in results["q3"].output

    # Every process of the bash call is gone, the one that left its process group included.
    assert await all_gone(mark)

    # History stays valid: every call of the assistant message has its result, in order.
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert [m.role for m in history] == [
        session_pb2.MESSAGE_ROLE_USER,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        *[session_pb2.MESSAGE_ROLE_TOOL] * len(calls),
    ]
    assert [m.tool_call_id for m in history[2:]] == [c["id"] for c in calls]
    assert history[2 + 2].tool_result.error_kind == tools_pb2.ERROR_KIND_CANCELLED

    await client.wait_idle(session.session_id)
    assert not await client.cancel(session.session_id)
    # The session is usable again, and the model sees the whole (valid) history.
    events = await client.send(session.session_id, "carry on")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert events[-1].turn_finished.final_text == "Next turn."


async def test_delete_cancels_the_running_turn(client: Client, workspace: Path, tmp_path: Path, mark: str) -> None:
    bash = f"sleep {mark}"
    model = scripted(tmp_path, [{"text": "Slow.", "tool_calls": [call("bash", "long", command=bash)]}])
    session = await client.create(workspace, model)
    sid = session.session_id
    watch = client.watch_stream(sid, after=0, follow=True)
    stream = None
    try:
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.HasField("caught_up") and first.caught_up.last_sequence == 0
        # Only once subscribed: a turn started alongside the watch could store events before it.
        stream = client.send_stream(sid, "go")
        await read_until(stream, lambda r: kind(r.event) == "tool_call_started", [])
        await poll_until(lambda: bool(pids_with(mark)), what="bash to start")

        await asyncio.wait_for(
            client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=sid), timeout=10), 10
        )

        rest = await read_rest(stream)
        assert kind(rest[-1].event) == "turn_finished"
        assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
        watched: list = []
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            while True:
                item = await asyncio.wait_for(watch.read(), 10)
                assert item is not grpc.aio.EOF
                watched.append(item)
        assert error_details(gone.value).code == grpc.StatusCode.NOT_FOUND
        assert kind(watched[-1].event) == "turn_finished"
    finally:
        if stream is not None:
            stream.cancel()
        watch.cancel()
    assert await all_gone(mark)
    assert (await rpc_error(client.get(sid))).code == grpc.StatusCode.NOT_FOUND


async def test_a_command_cut_off_by_the_sessions_time_limit_returns_its_output_so_far(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # The lane's time limit (3 s) is shorter than the command's own (the default 120 s): the
    # command was cut off from outside, and the model read only "bash timed out after 3s".
    command = "echo started here; sleep 100"
    model = scripted(tmp_path, [{"tool_calls": [call("bash", "c_1", command=command)]}, {"text": "ok"}])
    limit = duration_pb2.Duration(seconds=3)
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE, timeout=limit)])
    session = await client.create(workspace, model, queue=queue)
    events = await client.send(session.session_id, "go")
    result = _by_call(events, "tool_call_finished")["c_1"].tool_call_finished.result
    assert result.error_kind == tools_pb2.ERROR_KIND_TIMEOUT, result.output
    assert result.output.startswith("started here\n") and "time limit the session sets" in result.output


async def test_a_quick_command_runs_whole_under_a_short_time_limit_of_the_session(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # The lane's time limit is 1 s, which a quick command keeps well within: the second kept to end
    # a command cut off with its output was taken whole from it, and every command was killed at
    # once ("timed out at the time limit the session sets").
    model = scripted(tmp_path, [{"tool_calls": [call("bash", "c_1", command="echo quick")]}, {"text": "ok"}])
    limit = duration_pb2.Duration(seconds=1)
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE, timeout=limit)])
    session = await client.create(workspace, model, queue=queue)
    events = await client.send(session.session_id, "go")
    result = _by_call(events, "tool_call_finished")["c_1"].tool_call_finished.result
    assert result.exit_code == 0 and result.output == "quick", result.output


async def test_max_turns_ends_the_turn(client: Client, workspace: Path, tmp_path: Path) -> None:
    looping = {"text": "Again.", "tool_calls": [call("read", file_path="a.txt")]}
    model = scripted(tmp_path, [looping, looping, looping, {"text": "never reached"}])
    session = await client.create(workspace, model, max_turns=2)
    assert session.config.max_turns == 2
    events = await client.send(session.session_id, "loop")
    finished = events[-1].turn_finished
    assert finished.stop_reason == events_pb2.STOP_REASON_MAX_TURNS
    assert finished.model_requests == 2 and finished.tool_calls == 2
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert len(history) == 1 + 2 * 2


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_sessions_max_output_tokens_is_what_the_model_is_asked_for(
    make_server, workspace: Path, tmp_path: Path, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fixed at 8192, it made every request of a model whose output limit is smaller a 400.
    async with mock_llm(monkeypatch, write_script(tmp_path, [{"text": "hi"}])) as mock:
        client = (await make_server()).client
        small = await client.create(workspace, f"{provider}:mock", max_output_tokens=4096)
        default = await client.create(workspace, f"{provider}:mock")
        assert (small.config.max_output_tokens, default.config.max_output_tokens) == (4096, 8192)
        for session in (small, default):
            await client.send(session.session_id, "hello")
        bodies = [request.body for request in mock.requests]
    field = "max_completion_tokens" if provider == "openai" else "max_tokens"
    assert [body[field] for body in bodies] == [4096, 8192]


async def test_a_session_whose_script_vanished_is_failed_precondition(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    model = scripted(tmp_path, [{"text": "hi"}])
    session = await client.create(workspace, model)
    os.unlink(model.removeprefix("scripted:"))
    error = await rpc_error(client.send(session.session_id, "hello"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "MODEL_UNAVAILABLE" and error.metadata == {"model": model}


async def test_a_turn_cancelled_or_deleted_before_it_ran_still_ends(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A CancelTurn or DeleteSession right behind SendMessage cancelled the turn's task before its
    # first step: its coroutine never ran, so neither did its clean-up. The session stayed running
    # for good, its server-wide turn slot taken, its SendMessage stream open without TurnFinished.
    server = await make_server(limits=Limits(max_running_turns=1))
    manager = server.server.sessions
    assert manager is not None
    model = scripted(tmp_path, [{"text": "Done."}, {"text": "Done again."}])
    session = (await server.client.create(workspace, model)).session_id
    _, events = await manager.start_turn(session, "go")
    assert manager.cancel_turn(session)  # before the task's first step: no await in between
    received = [event.payload for batch in await asyncio.wait_for(_all(events), 10) for event in batch]
    assert [type(p).__name__ for p in received] == ["TurnStarted", "TurnFinished"]
    assert received[-1].stop_reason == "cancelled"
    assert (await server.client.get(session)).state == session_pb2.SESSION_STATE_IDLE
    # Its slot is free (one at most here), and the session takes its next turn.
    events = await server.client.send(session, "again")
    assert kind(events[-1]) == "turn_finished"
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN

    other = (await server.client.create(workspace, model)).session_id
    await manager.start_turn(other, "go")
    await manager.delete_session(other)  # its turn's task had not started either
    assert manager.running_turns() == 0
    events = await server.client.send(session, "and again")
    assert kind(events[-1]) == "turn_finished"


async def _all(events) -> list:
    return [batch async for batch in events]


async def test_a_message_sent_while_its_session_is_deleted_is_not_found_and_starts_no_turn(
    make_server, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # DeleteSession waits for the running turn to end. A SendMessage landing in between (the turn
    # ended, its session not yet gone) started a turn of a session about to be deleted: it failed
    # with an UnknownSession traceback in the server's log, and its client got events, then
    # NOT_FOUND "deleted during the turn". Now a session being deleted takes no new turn.
    caplog.set_level(logging.ERROR)
    server = await make_server()
    client, manager = server.client, server.server.sessions
    assert manager is not None
    # The turn waits for a confirmation no one gives: it runs until the delete cancels it.
    model = scripted(tmp_path, [{"text": "Writing.", "tool_calls": [call("write", file_path="x.txt", content="x")]}])
    ask = session_pb2.PermissionPolicy(ask=["write"])
    late: list[tuple[int, ErrorDetails]] = []  # per SendMessage that failed other than TURN_IN_PROGRESS
    refused: Counter[str] = Counter()  # SendMessages refused as TURN_IN_PROGRESS, per session

    async def keep_sending(sid: str) -> None:
        while True:
            stream = client.send_stream(sid, "again")
            seen: list = []
            try:
                async for item in stream:
                    seen.append(item)
            except grpc.aio.AioRpcError as exc:
                error = error_details(exc)
                if error.reason != "TURN_IN_PROGRESS":
                    late.append((len(seen), error))
                    return
                refused[sid] += 1
            else:
                raise AssertionError(f"a turn of a session being deleted ran to its end: {seen}")

    for _ in range(DELETE_RACE_ROUNDS):
        sid = (await client.create(workspace, model, permissions=ask)).session_id
        first = client.send_stream(sid, "go")
        await read_until(first, lambda r: kind(r.event) == "confirmation_required", [])
        senders = [asyncio.create_task(keep_sending(sid)) for _ in range(DELETE_RACE_SENDERS)]
        # The senders are at it: as many SendMessages as senders have been refused as TURN_IN_PROGRESS.
        await poll_until(lambda sid=sid: refused[sid] >= DELETE_RACE_SENDERS, what="SendMessages to be refused")
        await client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=sid), timeout=10)
        await asyncio.wait_for(asyncio.gather(*senders), 10)
        rest = await read_rest(first)
        assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED

    assert len(late) == DELETE_RACE_ROUNDS * DELETE_RACE_SENDERS
    assert all(error.code == grpc.StatusCode.NOT_FOUND and error.reason == "SESSION_NOT_FOUND" for _, error in late)
    assert [events for events, _ in late if events] == []  # no turn started: not one event
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    # Nothing is left running: no turn, no turn slot, no turn's task.
    assert manager.running_turns() == 0 and server.server.admission.running_turns == 0
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("turn-")] == []



def _write_among_many(tmp_path: Path, leading_queries: int) -> str:
    """A response whose Execute call (a write) comes after `leading_queries` Query calls and
    before enough others that the server makes them over several loop turns."""
    calls = [call("ls", f"early_{i}", path=".") for i in range(leading_queries)]
    calls.append(call("write", "the_write", file_path="written.txt", content="x"))
    calls += [call("ls", f"late_{i}", path=".") for i in range(250 - leading_queries)]
    return scripted(tmp_path, [{"text": "many", "tool_calls": calls}, {"text": "done"}], "many.yaml")


async def test_no_execute_call_starts_before_its_response_is_announced(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    session = await client.create(workspace, _write_among_many(tmp_path, leading_queries=0))
    events = await client.send(session.session_id, "go")
    kinds = [kind(e) for e in events]
    write_started = next(i for i, e in enumerate(events) if kind(e) == "tool_call_started"
                         and e.tool_call_started.call.tool_name == "write")
    assert kinds.index("model_responded") < write_started


async def test_a_cancel_at_any_loop_turn_of_a_long_response_runs_no_write_the_history_lacks(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # Cancelled after 0, 1, 2... turns of the event loop from the model's first words, as a
    # CancelTurn handled in that loop turn would be: some land while the model streams, some while
    # the server makes the calls after it (a batch per loop turn), some once they run. Counted
    # from the first words, not from the turn's start: the turn's way to its model request
    # crosses store threads, so a count from the start landed anywhere (and once nowhere between).
    server = await make_server()
    manager = server.server.sessions
    model = _write_among_many(tmp_path, leading_queries=1)
    recorded_counts = []
    for loop_turns in range(16):
        session = (await server.client.create(workspace, model)).session_id
        _, events = await manager.start_turn(session, "go")
        first_words = 2  # TurnStarted is the session's first event, TextDelta its second
        # Loop turns are what this counts, so it polls once per loop turn (an Event's wake-up
        # would add loop turns of its own).
        while manager.events.last_assigned(session) < first_words:  # noqa: ASYNC110
            await asyncio.sleep(0)
        for _ in range(loop_turns):
            await asyncio.sleep(0)
        manager.cancel_turn(session)
        received = [event.payload for batch in await asyncio.wait_for(_all(events), 30) for event in batch]
        assert type(received[-1]).__name__ == "TurnFinished"
        history = await server.client.history(session)
        _assert_valid_history(history)
        answers = {m.tool_call_id: m.tool_result for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL}
        recorded_counts.append(len(answers))
        # Nothing written that the model does not hear of.
        if (workspace / "written.txt").exists():
            assert not answers["the_write"].is_error, loop_turns
            (workspace / "written.txt").unlink()
        else:
            assert "the_write" not in answers or answers["the_write"].is_error, loop_turns
    # Some cancels landed while the response's calls were being made, the case this is about.
    assert any(2 <= count < 251 for count in recorded_counts), recorded_counts


async def test_a_turn_whose_history_the_store_refuses_ends_store_unavailable_in_one_log_line(
    make_server, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server: InProcess = await make_server()
    model = scripted(tmp_path, [{"text": "reading", "tool_calls": [call("read", file_path="a.txt")]},
                                {"text": "done"}])
    session = await server.client.create(workspace, model)
    # The store itself refuses the model's response (as a full disk would refuse the write).
    with sqlite3.connect(server.server.config.data_dir / "codelane.db") as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.role = 'assistant' "
                   "BEGIN SELECT RAISE(ABORT, 'the disk is full'); END")
    caplog.clear()
    events = await server.client.send(session.session_id, "go")
    [error] = [e.error for e in events if kind(e) == "error"]
    assert error.reason == "STORE_UNAVAILABLE" and error.fatal and "the disk is full" in error.message
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_ERROR
    assert events[-1].turn_finished.tool_calls == 1  # the read ran, though its history was refused
    assert not [r for r in caplog.records if r.exc_info], "a store failure is not a bug: no traceback"
    assert [r.levelname for r in caplog.records if "could not store its history" in r.getMessage()] == ["ERROR"]


async def test_a_call_id_the_model_repeats_in_a_later_step_gets_one_of_the_servers(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", "call_0", file_path="a.txt")]},
                                {"text": "", "tool_calls": [call("read", "call_0", file_path="README.md")]},
                                {"text": "done"}], "repeats.yaml")
    session = await client.create(workspace, model)
    events = await client.send(session.session_id, "go")
    started = [e.tool_call_started.call.call_id for e in events if kind(e) == "tool_call_started"]
    assert started[0] == "call_0" and started[1] != "call_0" and started[1].startswith("call_")
    history = await client.history(session.session_id)
    _assert_valid_history(history)
    assert [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL] == started


async def test_a_call_id_of_an_earlier_turn_gets_one_of_the_servers(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # A late answer to the earlier turn's call must not answer the later one (models number
    # their ids: "call_0" in every response).
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", "call_0", file_path="a.txt")]},
                                {"text": "done"},
                                {"text": "", "tool_calls": [call("read", "call_0", file_path="README.md")]},
                                {"text": "done again"}], "turns.yaml")
    session = await client.create(workspace, model)
    first = await client.send(session.session_id, "one")
    second = await client.send(session.session_id, "two")
    ids = [e.tool_call_started.call.call_id for e in first + second if kind(e) == "tool_call_started"]
    assert ids[0] == "call_0" and ids[1] not in ("call_0", "") and ids[1].startswith("call_")
