"""Admission control on a real server: each limit refuses the excess with RESOURCE_EXHAUSTED,
AT_CAPACITY naming the limit and a retry delay (ErrorInfo and RetryInfo), and changes nothing;
pending Query calls over a limit get an AT_CAPACITY result; a stopping server admits nothing new
and lets running turns finish (or interrupts them); health follows the store and the drain."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from codelane.v1 import events_pb2, session_pb2, session_pb2_grpc, tools_pb2
from session_server.admission import Admission, AtCapacity, Limits, ShuttingDown
from tests.ops.conftest import HealthWatch, health_status, scrape_until
from tests.polling import poll_until
from tests.session.conftest import (
    ErrorDetails,
    Processes,
    call,
    collect,
    error_details,
    kind,
    read_rest,
    read_until,
    rpc_error,
    scripted,
)

ASK_WRITE = session_pb2.PermissionPolicy(ask=["write"])


def _retry_delay(exc: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(exc)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError(f"no RetryInfo in {status}")


async def _refusal(awaitable) -> tuple[ErrorDetails, float]:
    """The error of a refused call, and the delay its RetryInfo asks for."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(awaitable, 20)
    return error_details(caught.value), _retry_delay(caught.value)


def _waiting_write(tmp_path: Path, name: str = "script.yaml") -> str:
    """A model whose turn waits at a confirmation (the session asks before writes) until answered."""
    return scripted(tmp_path, [
        {"text": "", "tool_calls": [call("write", "w1", file_path="out.txt", content="x\n")]},
        {"text": "Written."},
    ], name)


async def test_sessions_over_the_limit_are_refused_and_nothing_is_created(make_server, workspace, tmp_path) -> None:
    server = await make_server(limits=Limits(max_sessions=2))
    client = server.client
    model = _waiting_write(tmp_path)
    first = await client.create(workspace, model)
    await client.create(workspace, model)
    details, delay = await _refusal(client.create(workspace, model))
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "AT_CAPACITY"
    assert details.metadata == {"limit": "max_sessions", "value": "2", "retry_after_seconds": f"{delay:g}"}
    assert delay > 0 and "--max-sessions" in details.message
    assert await client.count_sessions() == 2
    await client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=first.session_id), timeout=10)
    await client.create(workspace, model)  # a deleted session frees its place
    assert await client.count_sessions() == 2


async def test_sessions_stored_before_a_restart_count(make_server, workspace, tmp_path) -> None:
    data = tmp_path / "shared-data"
    server = await make_server(data_dir=data)
    await server.client.create(workspace, _waiting_write(tmp_path))
    await server.server.stop(grace=0.5)
    again = await make_server(data_dir=data, limits=Limits(max_sessions=1))
    details = await rpc_error(again.client.create(workspace, _waiting_write(tmp_path)))
    assert details.metadata["limit"] == "max_sessions"


async def test_turns_over_the_limit_are_refused_and_the_session_is_untouched(make_server, workspace, tmp_path) -> None:
    server = await make_server(limits=Limits(max_running_turns=1))
    client = server.client
    busy = await client.create(workspace, _waiting_write(tmp_path), permissions=ASK_WRITE)
    other = await client.create(workspace, _waiting_write(tmp_path))
    stream = client.send_stream(busy.session_id, "write it")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)

    details, delay = await _refusal(client.send(other.session_id, "me too"))
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "AT_CAPACITY"
    assert details.metadata["limit"] == "max_running_turns" and details.metadata["value"] == "1"
    assert delay == float(details.metadata["retry_after_seconds"]) > 0
    untouched = await client.get(other.session_id)
    assert untouched.last_sequence == 0 and untouched.state == session_pb2.SESSION_STATE_IDLE

    await client.sessions.ConfirmToolCall(session_pb2.ConfirmToolCallRequest(
        session_id=busy.session_id, call_id="w1", approve=True), timeout=10)
    await collect(stream)
    await client.wait_idle(busy.session_id)
    events = await client.send(other.session_id, "now")  # the slot is free again
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN


async def test_event_streams_over_the_limit_are_refused(make_server, workspace, tmp_path) -> None:
    server = await make_server(limits=Limits(max_subscribers=1))
    client = server.client
    session = await client.create(workspace, _waiting_write(tmp_path))
    first = client.watch_stream(session.session_id, follow=True)
    assert (await first.read()).HasField("caught_up")
    details, delay = await _refusal(collect(client.watch_stream(session.session_id, follow=False)))
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.metadata["limit"] == "max_subscribers" and delay > 0
    first.cancel()

    async def watch_again() -> bool:
        try:
            await collect(client.watch_stream(session.session_id, follow=False))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    # The server frees the place once it sees the cancelled stream go.
    await poll_until(watch_again, what="the cancelled stream to free its place")


async def test_query_calls_over_the_per_session_limit_get_an_at_capacity_result(
    make_server, workspace, tmp_path
) -> None:
    server = await make_server(limits=Limits(max_pending_query_calls_per_session=2))
    reads = [call("read", f"r{i}", file_path="a.txt") for i in range(4)]
    session = await server.client.create(workspace, scripted(tmp_path, [{"text": "", "tool_calls": reads},
                                                                        {"text": "Read what I could."}]))
    events = await server.client.send(session.session_id, "read four times")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result
               for e in events if kind(e) == "tool_call_finished"}
    assert [results[f"r{i}"].is_error for i in range(4)] == [False, False, True, True]
    for refused in ("r2", "r3"):
        assert results[refused].error_kind == tools_pb2.ERROR_KIND_AT_CAPACITY
        assert "--max-pending-query-calls-per-session" in results[refused].output
    # The model got one result per call, in order, the refusals included.
    history = await server.client.history(session.session_id)
    assert [m.tool_call_id for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL] == [f"r{i}" for i in range(4)]
    # And the next turn's calls are admitted again: nothing stayed counted.
    assert server.server.admission.pending_query_calls == 0


def test_the_server_wide_query_call_limit_and_its_release() -> None:
    admission = Admission(Limits(max_pending_query_calls=3, max_pending_query_calls_per_session=2))
    assert admission.admit_query_call("a") is None
    assert admission.admit_query_call("a") is None
    assert "--max-pending-query-calls-per-session" in admission.admit_query_call("a")
    assert admission.admit_query_call("b") is None
    assert "--max-pending-query-calls)" in admission.admit_query_call("b")
    admission.release_query_call("a")
    assert admission.admit_query_call("b") is None
    assert admission.usage()["max_pending_query_calls"] == (3, 3)
    for session in ("a", "b", "b"):
        admission.release_query_call(session)
    assert admission.usage()["max_pending_query_calls"] == (0, 3)


def test_zero_means_no_limit_and_negative_limits_are_refused() -> None:
    unlimited = Admission(Limits(max_running_turns=0, max_subscribers=0))
    for _ in range(10_000):
        unlimited.acquire_turn()
        unlimited.acquire_subscriber()
    one = Admission(Limits(max_subscribers=1))
    one.acquire_subscriber()
    with pytest.raises(AtCapacity) as refused:
        one.acquire_subscriber()
    assert (refused.value.limit, refused.value.value) == ("max_subscribers", 1)
    one.release_subscriber()
    one.acquire_subscriber()
    with pytest.raises(ValueError, match="max_sessions"):
        Limits(max_sessions=-1)


def test_a_closed_admission_refuses_everything_new() -> None:
    admission = Admission(Limits())
    admission.close()
    for admit in (admission.acquire_turn, admission.acquire_subscriber, admission.check_session):
        with pytest.raises(ShuttingDown):
            admit()


async def test_a_stopping_server_admits_nothing_new_and_lets_a_running_turn_finish(
    make_server, workspace, tmp_path
) -> None:
    server = await make_server()
    client = server.client
    running = await client.create(workspace, _waiting_write(tmp_path), permissions=ASK_WRITE)
    idle = await client.create(workspace, _waiting_write(tmp_path))
    stream = client.send_stream(running.session_id, "write it")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    health = HealthWatch(server.server.address)
    await health.until("SERVING")

    stopping = asyncio.create_task(server.server.stop(grace=30))
    await health.until("NOT_SERVING")
    # The session whose turn still runs is told the same (not "already running a turn"): a new
    # turn is refused for the stop, and only a retry elsewhere or after the restart can start it.
    for refused in (client.create(workspace, _waiting_write(tmp_path)), client.send(idle.session_id, "hi"),
                    client.send(running.session_id, "and then?"), collect(client.watch_stream(idle.session_id))):
        details = await rpc_error(refused)
        assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "SHUTTING_DOWN", details
    # Work already running is still served: reads, and the confirmation the turn waits for.
    assert (await client.get(running.session_id)).state == session_pb2.SESSION_STATE_RUNNING
    await client.sessions.ConfirmToolCall(session_pb2.ConfirmToolCallRequest(
        session_id=running.session_id, call_id="w1", approve=True), timeout=10)
    events = [item.event for item in seen] + [item.event for item in await collect(stream)]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN  # finished, not interrupted
    await health.close()
    await asyncio.wait_for(stopping, 30)
    assert (workspace / "out.txt").read_text() == "x\n"


# A one-byte subscriber buffer puts the turn's own stream behind at every event: it reads them all
# from the store, so the server stops while it is behind, and it must still reach TurnFinished.
@pytest.mark.parametrize("subscriber_buffer_bytes", [None, 1], ids=["live", "behind"])
async def test_a_stopping_server_interrupts_a_turn_that_outlives_the_grace(
    make_server, workspace, tmp_path, subscriber_buffer_bytes
) -> None:
    server = await (make_server() if subscriber_buffer_bytes is None
                    else make_server(subscriber_buffer_bytes=subscriber_buffer_bytes))
    running = await server.client.create(workspace, _waiting_write(tmp_path), permissions=ASK_WRITE)
    stream = server.client.send_stream(running.session_id, "write it")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    await server.server.stop(grace=0.2)
    rest = [item.event for item in await collect(stream)]
    assert rest[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED


async def test_a_second_signal_ends_the_grace_and_the_turn_is_interrupted_at_once(
    processes: Processes, workspace, tmp_path
) -> None:
    # A grace far longer than the test may wait: the server stops within it only if the second
    # signal cuts it short (it was ignored, and a second Ctrl-C did nothing for the whole grace).
    server = await processes.start_server(tmp_path / "data", model=_waiting_write(tmp_path), local_workers=0,
                                          args=("--shutdown-grace", "3600", "--log-level", "INFO"))
    assert server.client is not None
    session = await server.client.create(workspace, permissions=ASK_WRITE)
    stream = server.client.send_stream(session.session_id, "write it")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    server.proc.send_signal(signal.SIGTERM)
    await poll_until(lambda: "SIGTERM: stopping" in server.log(), what="the server to start stopping")
    server.proc.send_signal(signal.SIGINT)
    rest = [item.event for item in await collect(stream)]
    assert rest[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    assert await asyncio.to_thread(server.proc.wait, 30) == 128 + signal.SIGINT
    assert "SIGINT again: interrupting the running turns now" in server.log()
    assert not (workspace / "out.txt").exists()


async def test_a_stopping_server_ends_follow_streams_and_claims_saying_so(make_server, workspace, tmp_path) -> None:
    # What would never end on its own, a WatchEvents that follows and a claim's long-poll, ends
    # with SHUTTING_DOWN and what to do (not the bare UNAVAILABLE of a call the gRPC server cuts),
    # once the turn the watcher follows has ended and the watcher has its last events.
    server = await make_server()
    client = server.client
    session = await client.create(workspace, _waiting_write(tmp_path), permissions=ASK_WRITE)
    sid = session.session_id
    send = client.send_stream(sid, "write it")
    sent: list = []
    await read_until(send, lambda r: kind(r.event) == "confirmation_required", sent)
    follow = client.watch_stream(sid, after=0, follow=True)
    watched: list = []
    await read_until(follow, lambda r: r.HasField("caught_up"), watched)
    claim = client.sessions.ClaimExternalTasks(session_pb2.ClaimExternalTasksRequest(
        session_id=sid, client_id="c1", wait=duration_pb2.Duration(seconds=60)), timeout=30)
    await poll_until(lambda: server.server.sessions.external._waiters.get(sid), what="the claim to long-poll")

    await asyncio.wait_for(server.server.stop(grace=0.2), 30)
    sent += await collect(send)  # the turn's own stream ends as it always did: after TurnFinished
    assert sent[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    await read_until(follow, lambda r: r.HasField("event") and kind(r.event) == "turn_finished", watched)
    for ended, what_to_do in ((read_rest(follow), "resume with WatchEvents after_sequence"), (claim, "claim again")):
        details = await rpc_error(ended)
        assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "SHUTTING_DOWN", details
        assert "shutting down" in details.message and what_to_do in details.message
        assert float(details.metadata["retry_after_seconds"]) > 0
    assert [item.event for item in watched if item.HasField("event")] == [item.event for item in sent]


async def test_health_is_not_serving_while_the_store_cannot_take_writes(make_server, workspace, tmp_path) -> None:
    server = await make_server(store_check_interval=0.05, metrics_listen="127.0.0.1:0")
    address = server.server.address
    assert await health_status(address) == "SERVING"
    health = HealthWatch(address)
    await health.until("SERVING")
    # Another process takes the store's write lock and keeps it: the server cannot store events.
    other = sqlite3.connect(tmp_path / "data-0" / "codelane.db", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        await health.until("NOT_SERVING")
        assert await health_status(address, "codelane.v1.SessionService") == "NOT_SERVING"
        await scrape_until(server.server.metrics_port,
                           lambda p: p.value("codelane_serving", condition="store") == 0, "the store condition")
    finally:
        other.execute("ROLLBACK")
        other.close()
    await health.until("SERVING")
    await health.close()


async def test_the_health_only_port_serves_health_and_nothing_else(make_server, workspace, tmp_path) -> None:
    server = await make_server(health_listen="127.0.0.1:0")
    address = f"127.0.0.1:{server.server.health_port}"
    assert await health_status(address) == "SERVING"
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await session_pb2_grpc.SessionServiceStub(channel).ListSessions(
                session_pb2.ListSessionsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    watch = HealthWatch(address)
    await watch.until("SERVING")
    stopping = asyncio.create_task(server.server.stop(grace=0.5))
    await watch.until("NOT_SERVING")
    await stopping
    await watch.close()


async def test_a_workers_health_follows_its_connection(make_server, workspace, tmp_path, worker_procs) -> None:
    server = await make_server()
    worker_procs.spawn(server.server.address, "w1", "--health-listen", "127.0.0.1:0")
    port = await worker_procs.port("w1", "health")
    await server.client.wait_workers("w1")
    watch = HealthWatch(f"127.0.0.1:{port}")
    await watch.until("SERVING")
    await server.server.stop(grace=0.5)  # the hub goes away: the worker keeps trying, not ready
    await watch.until("NOT_SERVING")
    await watch.close()
