"""External lane modes end to end: tasks claimed and completed, leases that expire and re-offer,
the overall deadline, cancellation and deletion leaving nothing behind, HYBRID announcements,
request validation, and the Python SDK's run_external_tasks loop with the example's bash handler."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.client import Client as SdkClient
from codelane.events import ExternalTaskCompleted as SdkExternalTaskCompleted
from codelane.events import ExternalTaskPending as SdkExternalTaskPending
from codelane.events import ToolResult as SdkToolResult
from codelane.events import TurnFinished as SdkTurnFinished
from codelane.v1 import admin_pb2, events_pb2, session_pb2, tools_pb2
from session_server.external import ExternalTasks
from tests.manual_time import ManualTime
from tests.polling import poll_until
from tests.session.conftest import (
    Client,
    InProcess,
    call,
    kind,
    read_rest,
    read_until,
    rpc_error,
    scripted,
)

QUERY, EXECUTE = tools_pb2.LANE_QUERY, tools_pb2.LANE_EXECUTE
EXTERNAL, HYBRID = tools_pb2.LANE_MODE_EXTERNAL, tools_pb2.LANE_MODE_HYBRID
EXAMPLE = Path(__file__).parents[2] / "clients" / "python" / "examples" / "external_bash.py"


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _queue(external_task_timeout: float | None = None, **modes: int) -> session_pb2.QueueConfig:
    lanes = [session_pb2.LaneConfig(lane={"query": QUERY, "execute": EXECUTE}[k], mode=v) for k, v in modes.items()]
    queue = session_pb2.QueueConfig(lanes=lanes)
    if external_task_timeout is not None:
        queue.external_task_timeout.CopyFrom(_duration(external_task_timeout))
    return queue


async def _claim(
    client: Client, session_id: str, client_id: str, max_tasks: int = 0, lease: float | None = None,
    wait: float | None = None,
) -> list[events_pb2.ExternalTask]:
    request = session_pb2.ClaimExternalTasksRequest(session_id=session_id, client_id=client_id, max_tasks=max_tasks)
    if lease is not None:
        request.lease.CopyFrom(_duration(lease))
    if wait is not None:
        request.wait.CopyFrom(_duration(wait))
    return list((await client.sessions.ClaimExternalTasks(request, timeout=(wait or 0) + 10)).tasks)


async def _complete(client: Client, session_id: str, task_id: str, client_id: str, **result: Any) -> None:
    request = session_pb2.CompleteExternalTaskRequest(
        session_id=session_id, task_id=task_id, client_id=client_id, result=tools_pb2.ToolResult(**result)
    )
    await client.sessions.CompleteExternalTask(request, timeout=10)


async def _renew(
    client: Client, session_id: str, task_id: str, client_id: str, lease: float
) -> events_pb2.ExternalTask:
    request = session_pb2.RenewExternalTaskLeaseRequest(
        session_id=session_id, task_id=task_id, client_id=client_id, lease=_duration(lease)
    )
    return (await client.sessions.RenewExternalTaskLease(request, timeout=10)).task


async def _start_one_external_write(client: Client, workspace: Path, tmp_path: Path) -> tuple[str, Any]:
    """A session whose Execute lane is EXTERNAL, its turn started: one `write` call to claim."""
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("write", "c_w", file_path="x", content="x")]},
                                {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    return session.session_id, client.send_stream(session.session_id, "go")


def _of_kind(events: list[events_pb2.Event], name: str) -> list[events_pb2.Event]:
    return [e for e in events if kind(e) == name]


async def _tool_results(client: Client, session_id: str) -> dict[str, tools_pb2.ToolResult]:
    history = await client.history(session_id)
    return {m.tool_call_id: m.tool_result for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL}


def _epoch(timestamp: Any) -> float:
    return timestamp.ToNanoseconds() / 1e9


async def _long_polling(server: InProcess) -> None:
    """Until a claim long-polls on the server (no event says so)."""
    await poll_until(lambda: server.server.sessions.external._waiters, what="a long-polling claim")


def _manual_time(server: InProcess) -> ManualTime:
    """Puts the server's external tasks on manual time (before any session uses them): leases
    end when the test advances it."""
    clock = ManualTime(current=float(int(time.time())))  # whole seconds: exact as a Timestamp
    server.server.sessions.external = ExternalTasks(clock=clock.now, timers=clock)
    return clock


def _empty(server: InProcess) -> bool:
    board = server.server.sessions.external
    return len(board) == 0 and not board._by_session and not board._waiters


async def test_external_task_claimed_and_completed(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    calls = [call("bash", "c_bash", command="echo hi"), call("read", "c_read", file_path="a.txt")]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    sid = session.session_id

    claim = asyncio.create_task(_claim(client, sid, "cli-1", max_tasks=5, wait=10))  # long-polls: nothing yet
    await _long_polling(server)
    sent, sent_at = time.time(), time.monotonic()
    stream = client.send_stream(sid, "go")
    [task] = await asyncio.wait_for(claim, 10)
    claimed, claimed_at = time.time(), time.monotonic()
    assert task.call.call_id == "c_bash" and task.call.tool_name == "bash"
    assert task.session_id == sid and task.lane == EXECUTE and task.attempt == 1
    assert task.workspace == session.workspace
    # The default lease (30 s) from the claim, and the default overall timeout (600 s) from the
    # offer, both of which happened between `sent` and `claimed` (the server's clock is ours).
    assert sent + 30 - 1e-6 <= _epoch(task.lease_expire_time) <= claimed + 30 + 1e-6
    assert sent + 600 - 1e-6 <= _epoch(task.deadline) <= claimed + 600 + 1e-6
    assert await _claim(client, sid, "cli-2") == []  # leased to cli-1

    completing_at = time.monotonic()
    await _complete(client, sid, task.task_id, "cli-1", output="hi from the client\n", exit_code=0)
    events = [r.event for r in await read_rest(stream)]

    results = await _tool_results(client, sid)
    assert results["c_bash"].output == "hi from the client\n"
    assert results["c_bash"].worker_id == "cli-1" and results["c_bash"].exit_code == 0
    assert not results["c_read"].is_error
    [pending] = _of_kind(events, "external_task_pending")
    assert pending.external_task_pending.task.task_id == task.task_id
    assert not pending.external_task_pending.task.HasField("lease_expire_time")
    [completed] = _of_kind(events, "external_task_completed")
    assert completed.external_task_completed.client_id == "cli-1"
    assert completed.external_task_completed.call_id == "c_bash"
    started = {e.tool_call_started.call.call_id: e.tool_call_started for e in _of_kind(events, "tool_call_started")}
    assert started["c_bash"].worker_id == "cli-1" and started["c_bash"].lane == EXECUTE
    # The Execute call stays a barrier: the read after it starts only once the task is completed.
    order = [(kind(e), e.tool_call_started.call.call_id if kind(e) == "tool_call_started" else "") for e in events]
    assert order.index(("external_task_completed", "")) < order.index(("tool_call_started", "c_read"))
    finished = {e.tool_call_finished.call_id: e.tool_call_finished for e in _of_kind(events, "tool_call_finished")}
    # Queue wait: offer to claim. Run time: claim to completion, however long the client took.
    assert finished["c_bash"].queue_wait.ToNanoseconds() / 1e9 <= claimed_at - sent_at
    assert finished["c_bash"].run_time.ToNanoseconds() / 1e9 >= completing_at - claimed_at
    assert _empty(server)
    error = await rpc_error(_complete(client, sid, task.task_id, "cli-1", output="again"))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "TASK_NOT_FOUND"


async def test_expired_lease_is_offered_again(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    sid, stream = await _start_one_external_write(client, workspace, tmp_path)
    [first] = await _claim(client, sid, "cli-a", lease=0.2, wait=10)
    assert first.attempt == 1
    [second] = await _claim(client, sid, "cli-b", wait=10)  # waits for the lease to expire
    assert second.task_id == first.task_id and second.attempt == 2

    error = await rpc_error(_complete(client, sid, first.task_id, "cli-a", output="late"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "LEASE_NOT_HELD"
    assert error.metadata == {"task_id": first.task_id, "client_id": "cli-a"}
    await _complete(client, sid, second.task_id, "cli-b", output="done by b")
    events = [r.event for r in await read_rest(stream)]

    result = (await _tool_results(client, sid))["c_w"]
    assert result.output == "done by b" and result.attempt == 2 and result.worker_id == "cli-b"
    pendings = [e.external_task_pending.task.attempt for e in _of_kind(events, "external_task_pending")]
    assert pendings == [1, 2]
    assert [e.tool_call_started.worker_id for e in _of_kind(events, "tool_call_started")] == ["cli-a", "cli-b"]
    [completed] = _of_kind(events, "external_task_completed")
    assert completed.external_task_completed.client_id == "cli-b"
    assert not (workspace / "x").exists()  # the server never ran it
    assert _empty(server)


async def test_renewing_a_lease_keeps_the_task_past_its_first_lease(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    clock = _manual_time(server)
    client = server.client
    sid, stream = await _start_one_external_write(client, workspace, tmp_path)
    [task] = await _claim(client, sid, "cli-a", lease=5, wait=10)
    assert _epoch(task.lease_expire_time) == clock.now() + 5
    for _ in range(4):  # 16 s of work on a 5 s lease, renewed as it goes
        clock.advance(4)
        renewed = await _renew(client, sid, task.task_id, "cli-a", 5)
        assert renewed.task_id == task.task_id and renewed.attempt == 1
        assert _epoch(renewed.lease_expire_time) == clock.now() + 5
    assert await _claim(client, sid, "cli-b") == []  # still cli-a's
    error = await rpc_error(_renew(client, sid, task.task_id, "cli-b", 5))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "LEASE_NOT_HELD"
    await _complete(client, sid, task.task_id, "cli-a", output="done by a")
    events = [r.event for r in await read_rest(stream)]

    result = (await _tool_results(client, sid))["c_w"]
    assert result.output == "done by a" and result.attempt == 1
    assert len(_of_kind(events, "external_task_pending")) == 1  # never offered again
    assert _empty(server)


async def test_an_expired_lease_cannot_be_renewed(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    sid, stream = await _start_one_external_write(client, workspace, tmp_path)
    [task] = await _claim(client, sid, "cli-a", lease=0.1, wait=10)
    [again] = await _claim(client, sid, "cli-b", wait=10)  # after the lease expired
    error = await rpc_error(_renew(client, sid, task.task_id, "cli-a", 5))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.metadata == {"task_id": task.task_id, "client_id": "cli-a"}
    await _complete(client, sid, again.task_id, "cli-b", output="b")
    await read_rest(stream)


@pytest.mark.parametrize(
    ("fields", "code", "detail"),
    [
        ({"task_id": "task_nope"}, grpc.StatusCode.NOT_FOUND, {"task_id": "task_nope"}),
        ({"client_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, {"field": "client_id"}),
        ({"task_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, {"field": "task_id"}),
        ({"lease": _duration(0)}, grpc.StatusCode.INVALID_ARGUMENT, {"field": "lease"}),
        ({"lease": _duration(7200)}, grpc.StatusCode.INVALID_ARGUMENT, {"field": "lease"}),
        ({"session_id": "s_nope"}, grpc.StatusCode.NOT_FOUND, {"session_id": "s_nope"}),
    ],
)
async def test_bad_renewal_is_refused_and_changes_nothing(
    client: Client, workspace: Path, tmp_path: Path, fields: dict, code: grpc.StatusCode, detail: dict
) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]), queue=_queue(execute=EXTERNAL))
    request = session_pb2.RenewExternalTaskLeaseRequest(
        **{"session_id": session.session_id, "task_id": "task_1", "client_id": "cli-1", **fields}
    )
    error = await rpc_error(client.sessions.RenewExternalTaskLease(request))
    assert error.code == code and error.metadata == detail


async def test_overall_deadline_ends_the_call_with_a_timeout(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "c_bash", command="echo hi")]},
                                {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(0.3, execute=EXTERNAL))
    assert session.config.queue.external_task_timeout.ToNanoseconds() == 0.3e9
    started = time.monotonic()
    events = await client.send(session.session_id, "go")
    assert time.monotonic() - started >= 0.3

    [pending] = _of_kind(events, "external_task_pending")
    [completed] = _of_kind(events, "external_task_completed")
    assert completed.external_task_completed.task_id == pending.external_task_pending.task.task_id
    assert completed.external_task_completed.client_id == ""
    assert completed.external_task_completed.result.error_kind == tools_pb2.ERROR_KIND_TIMEOUT
    result = (await _tool_results(client, session.session_id))["c_bash"]
    assert result.error_kind == tools_pb2.ERROR_KIND_TIMEOUT
    assert "0.3s" in result.output and "ClaimExternalTasks" in result.output
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert _empty(server)
    assert await _claim(client, session.session_id, "cli-1") == []


async def test_cancel_turn_withdraws_its_tasks(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    calls = [call("grep", f"c_grep{i}", pattern="needle") for i in range(3)]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(query=EXTERNAL))
    sid = session.session_id
    stream = client.send_stream(sid, "go")
    seen: list[Any] = []
    for _ in range(3):
        await read_until(stream, lambda r: kind(r.event) == "external_task_pending", seen)
    [leased] = await _claim(client, sid, "cli-1")
    assert leased.lane == QUERY

    assert await client.cancel(sid)
    events = [r.event for r in seen + await read_rest(stream)]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
    results = await _tool_results(client, sid)
    assert {r.error_kind for r in results.values()} == {tools_pb2.ERROR_KIND_CANCELLED}
    completed = _of_kind(events, "external_task_completed")
    assert len(completed) == 3
    assert {c.external_task_completed.result.error_kind for c in completed} == {tools_pb2.ERROR_KIND_CANCELLED}
    assert _empty(server)
    assert await _claim(client, sid, "cli-2") == []
    error = await rpc_error(_complete(client, sid, leased.task_id, "cli-1", output="too late"))
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_deleting_the_session_withdraws_tasks_and_ends_claims(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    client = server.client
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "c_bash", command="echo")]}, {"text": "."}])
    session = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    other = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    stream = client.send_stream(session.session_id, "go")
    await read_until(stream, lambda r: kind(r.event) == "external_task_pending", [])
    waiting_claim = asyncio.create_task(_claim(client, other.session_id, "cli-1", wait=10))
    await poll_until(lambda: bool(server.server.sessions.external._waiters), what="a long-polling claim")

    await client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session.session_id), timeout=10)
    await client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=other.session_id), timeout=10)
    assert await asyncio.wait_for(waiting_claim, 5) == []  # ended by the deletion, not by its wait
    stream.cancel()
    assert _empty(server)
    error = await rpc_error(_claim(client, session.session_id, "cli-1"))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "SESSION_NOT_FOUND"


async def test_a_stopping_server_withdraws_its_tasks_without_blaming_a_cancel(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # Nobody cancelled the turn nor deleted the session: the server stopped (SIGTERM, the grace
    # over). The withdrawal said "cancelled with its turn (CancelTurn, or the session was deleted)".
    server: InProcess = await make_server()
    client = server.client
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "c_bash", command="echo")]}, {"text": "."}])
    session = await client.create(workspace, model, queue=_queue(execute=EXTERNAL))
    stream = client.send_stream(session.session_id, "go")
    seen: list[Any] = []
    await read_until(stream, lambda r: kind(r.event) == "external_task_pending", seen)

    await asyncio.wait_for(server.server.stop(grace=0), 15)
    events = [r.event for r in seen + await read_rest(stream)]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    [completed] = _of_kind(events, "external_task_completed")
    result = completed.external_task_completed.result
    assert result.error_kind == tools_pb2.ERROR_KIND_CANCELLED
    assert "server stopped" in result.output and "CancelTurn" not in result.output, result.output


async def test_hybrid_runs_internally_and_announces(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    client = server.client
    calls = [call("write", "c_write", file_path="made.txt", content="by codelane\n"),
             call("read", "c_read", file_path="made.txt")]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    session = await client.create(workspace, model, queue=_queue(execute=HYBRID))
    claim = asyncio.create_task(_claim(client, session.session_id, "cli-1", wait=0.5))
    events = await client.send(session.session_id, "go")
    assert await claim == []  # announced, never claimable

    assert (workspace / "made.txt").read_text() == "by codelane\n"
    results = await _tool_results(client, session.session_id)
    assert results["c_write"].worker_id == "local" and not results["c_write"].is_error
    assert "by codelane" in results["c_read"].output
    [pending] = _of_kind(events, "external_task_pending")
    assert pending.external_task_pending.task.call.call_id == "c_write"
    assert pending.external_task_pending.task.lane == EXECUTE
    [completed] = _of_kind(events, "external_task_completed")
    assert completed.external_task_completed.task_id == pending.external_task_pending.task.task_id
    assert completed.external_task_completed.client_id == "local"
    assert not completed.external_task_completed.result.is_error
    order = [kind(e) for e in events]
    assert order.index("external_task_pending") < order.index("tool_call_started") < order.index(
        "external_task_completed"
    )
    assert _empty(server)


async def test_lane_modes_are_shown_back(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(
        workspace, scripted(tmp_path, [{"text": "hi"}]), queue=_queue(120.0, query=HYBRID, execute=EXTERNAL)
    )
    got = await client.get(session.session_id)
    modes = {lane.lane: lane.mode for lane in got.config.queue.lanes}
    assert modes == {QUERY: HYBRID, EXECUTE: EXTERNAL}
    assert got.config.queue.external_task_timeout.seconds == 120
    default = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    assert {lane.mode for lane in default.config.queue.lanes} == {tools_pb2.LANE_MODE_INTERNAL}
    assert default.config.queue.external_task_timeout.seconds == 600


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"client_id": ""}, "client_id"),
        ({"client_id": "c" * 257}, "client_id"),  # kept with each task it leases, and in events
        ({"max_tasks": -1}, "max_tasks"),
        ({"max_tasks": 101}, "max_tasks"),
        ({"lease": _duration(0)}, "lease"),
        ({"lease": _duration(7200)}, "lease"),
        ({"wait": _duration(61)}, "wait"),
    ],
)
async def test_bad_claim_is_invalid(
    client: Client, workspace: Path, tmp_path: Path, request_: dict, field: str
) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]), queue=_queue(execute=EXTERNAL))
    fields = {"session_id": session.session_id, "client_id": "cli-1", **request_}
    error = await rpc_error(client.sessions.ClaimExternalTasks(session_pb2.ClaimExternalTasksRequest(**fields)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}


async def test_complete_unknown_task_is_not_found(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    error = await rpc_error(_complete(client, session.session_id, "task_nope", "cli-1", output="x"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "TASK_NOT_FOUND" and error.metadata == {"task_id": "task_nope"}
    error = await rpc_error(_complete(client, session.session_id, "task_nope", "", output="x"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "client_id"}
    error = await rpc_error(_complete(client, "s_nope", "task_nope", "cli-1", output="x"))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "SESSION_NOT_FOUND"


@pytest.mark.parametrize("seconds", [2**63 - 1, -5], ids=["past-int64-nanos", "negative"])
async def test_a_result_with_an_impossible_run_time_is_timed_by_the_server(
    client: Client, workspace: Path, tmp_path: Path, seconds: int
) -> None:
    """A client's run_time of ~2^63 s could be stored but not sent (its nanoseconds pass int64):
    the turn's stream, every replay, the history and GetQueueStats failed for good with UNKNOWN."""
    sid, stream = await _start_one_external_write(client, workspace, tmp_path)
    await read_until(stream, lambda i: i.HasField("event") and kind(i.event) == "external_task_pending", [])
    claimed_at = time.monotonic()
    [task] = await _claim(client, sid, "cli-1")
    await _complete(client, sid, task.task_id, "cli-1", output="done", run_time=duration_pb2.Duration(seconds=seconds))
    events = [r.event for r in await read_rest(stream)]
    completed_at = time.monotonic()

    assert kind(events[-1]) == "turn_finished"
    [finished] = _of_kind(events, "tool_call_finished")
    assert 0 <= finished.tool_call_finished.run_time.ToNanoseconds() / 1e9 <= completed_at - claimed_at
    replayed, _ = await client.watch(sid)
    assert kind(replayed[-1]) == "turn_finished"
    assert (await _tool_results(client, sid))["c_w"].output == "done"
    stats = await client.admin.GetQueueStats(admin_pb2.GetQueueStatsRequest(), timeout=10)
    assert all(lane.latency_p99.ToNanoseconds() >= 0 for lane in stats.lanes)


async def test_results_with_deeply_nested_metadata_are_all_kept(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    """metadata_json parsed at the depth of the RPC handler could be too deep to write again deeper
    in the turn's stack: the turn failed with RecursionError, and the history lost the step
    (the model's calls and their results, whose effects had happened). Depths around the
    interpreter's limit, one call each: where it breaks depends on the stack."""
    depths = range(600, 1001, 10)
    calls = [call("write", f"c_{depth}", file_path=f"f{depth}", content="x") for depth in depths]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    sid = (await client.create(workspace, model, queue=_queue(execute=EXTERNAL))).session_id
    stream = client.send_stream(sid, "go")
    for depth in depths:
        await read_until(stream, lambda i: i.HasField("event") and kind(i.event) == "external_task_pending", [])
        [task] = await _claim(client, sid, "cli-1")
        assert task.call.call_id == f"c_{depth}"
        await _complete(client, sid, task.task_id, "cli-1", output="written", metadata_json="[" * depth + "]" * depth)
    events = [r.event for r in await read_rest(stream)]

    assert [kind(e) for e in events if kind(e) in ("error", "turn_finished")] == ["turn_finished"]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    results = await _tool_results(client, sid)
    assert [results[f"c_{depth}"].output for depth in depths] == ["written"] * len(depths)


# -- the Python SDK ----------------------------------------------------------------------------


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("external_bash_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_sdk_runs_external_bash_with_the_example_handler(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    example = _example()
    local = tmp_path / "client-side"
    local.mkdir()
    calls = [
        call("bash", "c_ok", command="echo from-the-client > proof.txt && pwd"),
        call("bash", "c_fail", command="echo failing; exit 3"),
        call("write", "c_write", file_path="w.txt", content="x"),
        call("bash", "c_rm", command="rm proof.txt"),
    ]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    async with SdkClient(server.client.address, timeout=10) as sdk:
        session = await sdk.create_session(
            workspace, model=model, lanes={"execute": "external"},
            permissions={"deny": [*example.NOT_RUN_HERE, "bash(rm *)"]}, external_task_timeout=30,
        )
        stop = asyncio.Event()
        runner = asyncio.create_task(
            session.run_external_tasks("sdk-client", example.bash_handler(local), stop=stop, wait=5)
        )
        events = [e async for e in session.send("go")]
        stop.set()
        ran = await asyncio.wait_for(runner, 10)
        history = {m.tool_call_id: m.tool_result for m in await session.messages() if m.role == "tool"}

    assert ran == 2
    assert isinstance(events[-1], SdkTurnFinished) and events[-1].stop_reason == "end_turn"
    assert (local / "proof.txt").read_text() == "from-the-client\n"  # ran on the client's side
    assert not (workspace / "proof.txt").exists()
    assert history["c_ok"].output.strip() == str(local)
    assert history["c_ok"].worker_id == "sdk-client" and history["c_ok"].exit_code == 0
    assert history["c_ok"].metadata["cwd"] == str(local)
    assert history["c_fail"].is_error and history["c_fail"].exit_code == 3
    assert history["c_fail"].error_kind == "tool_error"
    assert history["c_write"].error_kind == "permission_denied"  # withheld: this client runs only bash
    assert history["c_rm"].error_kind == "permission_denied"
    pendings = [e for e in events if isinstance(e, SdkExternalTaskPending)]
    assert [p.task.call.call_id for p in pendings if p.task is not None] == ["c_ok", "c_fail"]
    assert all(p.task is not None and p.task.attempt == 1 and p.task.lane == "execute" for p in pendings)
    done = [e for e in events if isinstance(e, SdkExternalTaskCompleted)]
    assert [d.client_id for d in done] == ["sdk-client", "sdk-client"]
    # The runner's last long-poll was cancelled by the client: the server drops its waiter when
    # the cancellation reaches it, which may be just after the runner returned.
    await poll_until(lambda: _empty(server), what="the runner's last claim to end on the server")


async def test_sdk_renews_the_lease_of_a_handler_that_outlasts_it(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "c_slow", command="x")]}, {"text": "."}])
    leases: list[float] = []
    lease = 1.0
    board = server.server.sessions.external

    def renewed_past_its_first_lease(task: Any) -> bool:
        # Only a renewal at or after the first lease's end pushes the end this far (a task
        # claimed again after losing its lease would show attempt 2).
        [info] = board.pending(task.session_id) or [None]
        return (info is not None and info.attempt == 1 and info.lease_expire_time is not None
                and info.lease_expire_time >= task.lease_expire_time + lease)

    async def slow(task: Any) -> Any:
        await poll_until(lambda: renewed_past_its_first_lease(task), what="the SDK to renew the lease")
        return SdkToolResult(output=f"slow {task.call.call_id}")

    async with SdkClient(server.client.address, timeout=10) as sdk:
        session = await sdk.create_session(workspace, model=model, lanes={"execute": "external"})
        stop = asyncio.Event()
        runner = asyncio.create_task(session.run_external_tasks("sdk-client", slow, stop=stop, lease=lease, wait=5))

        async def turn() -> list:
            return [e async for e in session.send("go")]

        # Without renewals the task would be offered again after its first lease.
        events = await asyncio.wait_for(turn(), 15)
        stop.set()
        assert await asyncio.wait_for(runner, 10) == 1
        [result] = [m.tool_result for m in await session.messages() if m.role == "tool"]
        leases = [e.task.attempt for e in events if isinstance(e, SdkExternalTaskPending) and e.task]
    assert result is not None and result.output == "slow c_slow" and result.attempt == 1
    assert leases == [1]  # never offered again: the lease was renewed while the handler ran


async def test_sdk_cancels_a_handler_whose_task_is_gone_and_claims_the_next(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # The handler of a task that had timed out ran on to its end, and with max_tasks=1 the loop
    # claimed nothing meanwhile: the turn's next task timed out unclaimed too.
    server: InProcess = await make_server()
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_stuck", command="x")]},
        {"text": "", "tool_calls": [call("bash", "c_next", command="y")]},
        {"text": "."},
    ])
    cancelled = asyncio.Event()

    async def handler(task: Any) -> Any:
        if task.call.call_id == "c_next":
            return SdkToolResult(output="next ran")
        try:
            await asyncio.Event().wait()  # stuck for good
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with SdkClient(server.client.address, timeout=10) as sdk:
        session = await sdk.create_session(workspace, model=model, lanes={"execute": "external"},
                                           external_task_timeout=1)
        stop = asyncio.Event()
        runner = asyncio.create_task(session.run_external_tasks("sdk-client", handler, stop=stop, lease=0.5, wait=5))

        async def turn() -> list:
            return [e async for e in session.send("go")]

        events = await asyncio.wait_for(turn(), 30)
        assert cancelled.is_set()
        stop.set()
        assert await asyncio.wait_for(runner, 10) == 1
        results = {m.tool_call_id: m.tool_result for m in await session.messages() if m.role == "tool"}
    assert isinstance(events[-1], SdkTurnFinished) and events[-1].stop_reason == "end_turn"
    assert results["c_stuck"].error_kind == "timeout"
    assert results["c_next"].output == "next ran"


async def _turn_run_by_sdk_handler(
    server: InProcess, workspace: Path, tmp_path: Path, calls: list[dict[str, Any]], handler: Any
) -> dict[str, Any]:
    """One turn making `calls`, its Execute lane external and run by the SDK's `run_external_tasks`
    with `handler`, which handles each call once: the results recorded, by call id."""
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "."}])
    async with SdkClient(server.client.address, timeout=10) as sdk:
        session = await sdk.create_session(workspace, model=model, lanes={"execute": "external"})
        stop = asyncio.Event()
        runner = asyncio.create_task(session.run_external_tasks("sdk-client", handler, stop=stop, wait=5))
        [e async for e in session.send("go")]
        stop.set()
        assert await asyncio.wait_for(runner, 10) == len(calls)
        return {m.tool_call_id: m.tool_result for m in await session.messages() if m.role == "tool"}


async def test_sdk_handler_exception_becomes_an_error_result(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()

    async def broken(task: Any) -> Any:
        raise RuntimeError(f"cannot run {task.call.tool_name} today")

    results = await _turn_run_by_sdk_handler(server, workspace, tmp_path, [call("bash", "c_bash", command="x")], broken)
    result = results["c_bash"]
    assert result is not None and result.is_error and result.error_kind == "tool_error"
    assert "RuntimeError: cannot run bash today" in result.output


async def test_sdk_handler_run_time_is_what_the_server_records(make_server, workspace: Path, tmp_path: Path) -> None:
    # The SDK sent a handler's result without its run_time, so the server recorded its own measure
    # (from the claim to the completion) where the Node client sends the handler's.
    server: InProcess = await make_server()

    async def timed(task: Any) -> Any:
        return SdkToolResult(output="ran", run_time=1.25)

    results = await _turn_run_by_sdk_handler(server, workspace, tmp_path, [call("bash", "c_bash", command="x")], timed)
    assert results["c_bash"].output == "ran" and results["c_bash"].run_time == 1.25


async def test_sdk_handler_returning_no_tool_result_completes_with_an_error_result(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A handler that forgets its return (None) or returns the output alone: the loop died with an
    # ExceptionGroup of an AttributeError, its task left claimed until its lease ran out, where the
    # Node client completes the task with an error result saying what the handler returned.
    server: InProcess = await make_server()
    calls = [call("bash", "c_none", command="x"), call("bash", "c_text", command="y")]

    async def careless(task: Any) -> Any:
        return None if task.call.call_id == "c_none" else "just the output"

    results = await _turn_run_by_sdk_handler(server, workspace, tmp_path, calls, careless)
    for call_id, returned in (("c_none", "None"), ("c_text", "'just the output'")):
        result = results[call_id]
        assert result is not None and result.is_error and result.error_kind == "tool_error"
        assert f"the handler returned {returned}, not a ToolResult" in result.output


async def test_sdk_confirm_and_stop_while_idle(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server()
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("write", "c_write", file_path="ok.txt", content="ok")]}, {"text": "."},
    ])
    async with SdkClient(server.client.address, timeout=10) as sdk:
        session = await sdk.create_session(workspace, model=model, permissions={"ask": ["write"], "default": "allow"})
        info = await sdk.get_session(session.id)
        assert info.id == session.id
        async for event in session.send("go"):
            if event.kind == "confirmation_required":
                await session.confirm("c_write", True, "fine")
        assert (workspace / "ok.txt").read_text() == "ok"

        # A loop with nothing to do stops promptly, in the middle of its long-poll.
        stop = asyncio.Event()
        runner = asyncio.create_task(session.run_external_tasks("idle", _never, stop=stop, wait=30))
        await _long_polling(server)
        stop.set()
        assert await asyncio.wait_for(runner, 5) == 0
        with pytest.raises(ValueError, match="unknown permissions keys"):
            await sdk.create_session(workspace, model=model, permissions={"alow": ["read"]})
        with pytest.raises(ValueError, match="lane mode"):
            await sdk.create_session(workspace, model=model, lanes={"execute": "outside"})
    await poll_until(lambda: _empty(server), what="the idle claim to end")


async def _never(task: Any) -> Any:
    raise AssertionError(f"no task expected, got {task}")
