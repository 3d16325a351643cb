"""The worker protocol's promises (docs/protocol.md), each held on a real server with real worker
processes or real streams: who checks arguments, one spec per tool name, what a worker lost for
silence sees, what a cancelled call records, what WorkerLost says, and what a call with no worker
to run it is told."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.v1 import admin_pb2, events_pb2, session_pb2, tools_pb2, worker_pb2, worker_pb2_grpc
from session_server.agent import MAX_SNAPSHOTS_PER_CALL
from tests.polling import poll_until
from tests.session import conftest as session_fixtures
from tests.session.conftest import (
    RPC_TIMEOUT,
    Client,
    EventStream,
    InProcess,
    call,
    error_details,
    kind,
    read_rest,
    read_until,
    scripted,
)

make_server = session_fixtures.make_server
workspace = session_fixtures.workspace

PLUGIN = "benchmarks.plugin_tools"
ECHO_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
               "additionalProperties": False}

BROKEN = "the connection to the worker broke (its process died or the network failed)"
HALF_CLOSED = "the worker's stream ended without Draining (the worker closed it, or its connection dropped)"
SNAPSHOT_CHANGED = tools_pb2.ToolResult(output="the snapshot changed", is_error=True,
                                        error_kind=tools_pb2.ERROR_KIND_SNAPSHOT_CHANGED)


def echo_spec(description: str = "Echo the text.") -> tools_pb2.ToolSpec:
    return tools_pb2.ToolSpec(name="echo", description=description, parameters_json_schema=json.dumps(ECHO_SCHEMA),
                              lane=tools_pb2.LANE_QUERY, idempotent=True)


class RawWorker:
    """A worker speaking the protocol from the raw stubs, on a real stream: what it received is
    what the hub sent."""

    def __init__(self, client: Client, worker_id: str, *specs: tools_pb2.ToolSpec) -> None:
        self.client = client
        self.outbox: asyncio.Queue[worker_pb2.ConnectRequest | None] = asyncio.Queue()
        self.outbox.put_nowait(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id=worker_id, version="test", tools=specs, slots=2)))
        self.stream = worker_pb2_grpc.WorkerHubServiceStub(client.channel).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[worker_pb2.ConnectRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def read(self) -> worker_pb2.ConnectResponse:
        message = await asyncio.wait_for(self.stream.read(), RPC_TIMEOUT)
        assert message is not grpc.aio.EOF
        return message

    def answer(self, dispatch_id: str, result: tools_pb2.ToolResult) -> None:
        self.outbox.put_nowait(worker_pb2.ConnectRequest(results=worker_pb2.CallResults(results=[
            worker_pb2.CallResult(dispatch_id=dispatch_id, result=result)])))

    def half_close(self) -> None:
        self.outbox.put_nowait(None)


async def echo_turn_on_raw_worker(make_server, workspace: Path, tmp_path: Path, worker_id: str,
                                  **config: Any) -> tuple[RawWorker, EventStream]:
    """A server that runs Query calls only on workers, a RawWorker offering echo on it, and a turn
    started whose model calls echo once (call id c1): the worker, and the turn's stream."""
    server: InProcess = await make_server(local_fallback=False)
    worker = RawWorker(server.client, worker_id, echo_spec())
    assert (await worker.read()).HasField("welcome")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("echo", "c1", text="hi")]}, {"text": "x"}])
    session = await server.client.create(workspace, model, **config)
    return worker, server.client.send_stream(session.session_id, "go")


def spawn(started: list[subprocess.Popen[bytes]], module: str, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stderr=subprocess.PIPE)
    started.append(proc)
    return proc


def spawn_worker(started: list[subprocess.Popen[bytes]], port: int, worker_id: str) -> subprocess.Popen[bytes]:
    return spawn(started, "tool_worker", "--connect", f"127.0.0.1:{port}", "--id", worker_id, "--slots", "2",
                 "--tools", PLUGIN)


@pytest.fixture
def processes():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def finished(events: list[events_pb2.Event]) -> dict[str, tools_pb2.ToolResult]:
    return {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
            if kind(e) == "tool_call_finished"}


# -- arguments --------------------------------------------------------------------------------------


async def test_arguments_against_the_schema_never_reach_a_worker(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server(local_workers=1, local_worker_tools=[PLUGIN], local_fallback=False)
    client = server.client
    await client.wait_workers("local-1")
    calls = [call("sleep", "c_type", ms="long"), call("sleep", "c_extra", ms=1, path="x"), call("sleep", "c_ok", ms=1)]
    session = await client.create(workspace, scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "ok"}]))
    events = await client.send(session.session_id, "go")

    results = finished(events)
    for refused in ("c_type", "c_extra"):
        result = results[refused]
        assert result.error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
        assert result.output.startswith("sleep was not run: invalid arguments for sleep"), result.output
        assert result.worker_id == ""
    assert not results["c_ok"].is_error and results["c_ok"].worker_id == "local-1"
    started = {e.tool_call_started.call.call_id for e in events if kind(e) == "tool_call_started"}
    assert started == {"c_ok"}
    [worker] = (await client.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT)).workers
    assert worker.completed_calls == 1  # the worker was sent the valid call only


# -- one spec per tool name -------------------------------------------------------------------------


async def test_a_worker_offering_a_tool_under_another_spec_is_refused_at_hello(make_server) -> None:
    server: InProcess = await make_server()
    client = server.client
    first = RawWorker(client, "first", echo_spec())
    assert (await first.read()).HasField("welcome")

    other = RawWorker(client, "other", echo_spec("Echo the text, louder."))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await other.read()
    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "TOOL_SPEC_CONFLICT"
    assert details.metadata == {"tool_name": "echo", "worker_id": "first"}
    assert "drain the workers with the old spec first" in details.message

    same = RawWorker(client, "same", echo_spec())
    assert (await same.read()).HasField("welcome")  # the same spec joins: more capacity
    assert await client.worker_ids() == {"first", "same"}

    # Once no ready worker holds the old spec, the new one may join.
    for old in (first, same):
        old.half_close()
    await poll_until(lambda: not server.server.pool.workers(), what="the old workers to leave")
    renamed = RawWorker(client, "other", echo_spec("Echo the text, louder."))
    assert (await renamed.read()).HasField("welcome")
    renamed.half_close()


async def test_a_worker_refused_at_hello_is_logged_by_the_server_with_why(make_server, caplog) -> None:
    """A worker of an older release (say, left running when the server and its local workers were
    upgraded) logs only "unavailable (FAILED_PRECONDITION): retrying", for ever: the server's log
    is where the operator learns which tool and which worker stand in the way."""
    server: InProcess = await make_server()
    client = server.client
    first = RawWorker(client, "first", echo_spec())
    assert (await first.read()).HasField("welcome")
    caplog.set_level("WARNING", logger="session_server.api.hub")

    other = RawWorker(client, "older", echo_spec("Echo the text, louder."))
    with pytest.raises(grpc.aio.AioRpcError):
        await other.read()
    [record] = [r for r in caplog.records if r.name == "session_server.api.hub"]
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert "older" in message and "TOOL_SPEC_CONFLICT" in message and "drain the workers with the old spec" in message

    # It retries for ever: the same refusal is a WARNING once a minute, not at every attempt.
    caplog.set_level("DEBUG", logger="session_server.api.hub")
    for _ in range(3):
        again = RawWorker(client, "older", echo_spec("Echo the text, louder."))
        with pytest.raises(grpc.aio.AioRpcError):
            await again.read()
    refusals = [r for r in caplog.records if r.name == "session_server.api.hub" and "refused" in r.getMessage()]
    assert [r.levelname for r in refusals] == ["WARNING", "DEBUG", "DEBUG", "DEBUG"]
    # Another worker, or another reason, is news.
    third = RawWorker(client, "third", echo_spec("Echo the text, louder."))
    with pytest.raises(grpc.aio.AioRpcError):
        await third.read()
    assert caplog.records[-1].levelname == "WARNING" and "third" in caplog.records[-1].getMessage()


def named(spec: tools_pb2.ToolSpec, name: str) -> tools_pb2.ToolSpec:
    renamed = tools_pb2.ToolSpec()
    renamed.CopyFrom(spec)
    renamed.name = name
    return renamed


async def test_tool_names_past_max_tools_are_refused_at_hello_as_at_capacity(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    own = len(server.server.registry.names())
    await server.server.stop(grace=1)
    server = await make_server(max_tools=own + 2)
    client = server.client

    first = RawWorker(client, "first", echo_spec(), named(echo_spec(), "read"))  # read is the server's own
    assert (await first.read()).HasField("welcome")
    over = RawWorker(client, "over", named(echo_spec(), "shout"), named(echo_spec(), "whisper"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await over.read()
    details = error_details(refused.value)
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "AT_CAPACITY")
    assert details.metadata == {"limit": "max_tools", "value": str(own + 2)}
    assert f"offers {own + 1} tool names" in details.message and "would add 2: shout, whisper" in details.message

    fits = RawWorker(client, "fits", echo_spec(), named(echo_spec(), "shout"))
    assert (await fits.read()).HasField("welcome")
    assert await client.worker_ids() == {"first", "fits"}
    session_id = (await client.create(workspace, scripted(tmp_path, [{"text": "ok"}]))).session_id
    tools = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=session_id), timeout=RPC_TIMEOUT)
    assert {"echo", "shout"} <= {tool.spec.name for tool in tools.tools}
    assert len(tools.tools) <= own + 2
    for worker in (first, fits):
        worker.half_close()


async def test_a_tool_spec_over_16_kib_is_refused_at_hello(make_server) -> None:
    client = (await make_server()).client
    big = RawWorker(client, "big", echo_spec("x" * (16 * 1024)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await big.read()
    details = error_details(refused.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HELLO")
    assert "'echo' is 16,5" in details.message and "at most 16,384" in details.message
    assert await client.worker_ids() == set()


async def test_a_stopping_server_ends_a_workers_stream_shutting_down(make_server) -> None:
    server: InProcess = await make_server()
    client = server.client
    worker = RawWorker(client, "w", echo_spec())
    assert (await worker.read()).HasField("welcome")
    await server.server.stop(grace=5)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await worker.read()
    details = error_details(ended.value)
    # What worker.proto promises, not gRPC's own "Cancelling all calls" of a server that stops.
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), details
    assert details.metadata == {"worker_id": "w"}


async def test_a_codelane_worker_logs_a_stopping_hub_at_info(make_server, processes) -> None:
    # A server that stops (`codelane run --embedded` at its end, a restart) is no fault: the
    # worker still retries, without a WARNING.
    server: InProcess = await make_server()
    proc = spawn_worker(processes, server.server.port, "w-stop")
    await server.client.wait_workers("w-stop")
    await server.server.stop(grace=5)

    def next_line_with(text: str) -> str:
        while line := proc.stderr.readline().decode():
            if text in line:
                return line
        raise AssertionError("the worker's stderr ended")

    line = await asyncio.wait_for(asyncio.to_thread(next_line_with, "ended our stream"), 20)
    assert " worker INFO hub at " in line and "(UNAVAILABLE SHUTTING_DOWN: " in line and line.endswith(
        "): retrying\n"), line
    # Nothing listens while it restarts: told as part of the stop it heard of, not a WARNING.
    line = await asyncio.wait_for(asyncio.to_thread(next_line_with, "retrying"), 20)
    assert " worker INFO " in line and "said it was shutting down" in line, line


async def test_max_tools_is_in_the_admission_metrics_as_every_limit(make_server) -> None:
    # docs/deploy.md: codelane_admission_limit / _in_use / _refusals_total by limit, "each limit";
    # --max-tools was in none of them, so a pool refusing workers at it looked idle.
    server: InProcess = await make_server()
    own = len(server.server.registry.names())
    await server.server.stop(grace=1)
    server = await make_server(max_tools=own + 1)
    registry = server.server.metrics.registry

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"limit": "max_tools"})

    assert (sample("codelane_admission_limit"), sample("codelane_admission_in_use")) == (own + 1, own)
    first = RawWorker(server.client, "first", echo_spec())
    assert (await first.read()).HasField("welcome")
    assert sample("codelane_admission_in_use") == own + 1
    over = RawWorker(server.client, "over", named(echo_spec(), "shout"))
    with pytest.raises(grpc.aio.AioRpcError):
        await over.read()
    assert sample("codelane_admission_refusals_total") == 1
    first.half_close()


def _lines_holding(proc: subprocess.Popen[bytes], text: str, count: int) -> list[str]:
    """The first `count` lines of the process's stderr that hold `text` (fewer if it ends first)."""
    seen = []
    while len(seen) < count and (line := proc.stderr.readline().decode()):
        if text in line:
            seen.append(line)
    return seen


async def test_a_codelane_worker_refused_at_max_tools_retries_and_says_so_once(make_server, processes) -> None:
    server: InProcess = await make_server()
    own = len(server.server.registry.names())
    await server.server.stop(grace=1)
    server = await make_server(max_tools=own)  # the plugin's tools are names the server lacks
    proc = spawn(processes, "tool_worker", "--connect", f"127.0.0.1:{server.server.port}", "--id", "w-full",
                 "--tools", PLUGIN, "--log-level", "DEBUG")

    lines = await asyncio.wait_for(
        asyncio.to_thread(_lines_holding, proc, "ended our stream (RESOURCE_EXHAUSTED AT_CAPACITY: ", 3), 60)
    assert len(lines) == 3, lines
    assert " worker WARNING " in lines[0] and "(--max-tools)" in lines[0] and lines[0].endswith(": retrying\n")
    assert all(" worker DEBUG " in line for line in lines[1:]), lines  # the same refusal: once a minute
    assert proc.poll() is None  # it keeps trying: room may come as other workers drain
    assert await server.client.worker_ids() == set()


# -- liveness ---------------------------------------------------------------------------------------


async def test_a_worker_process_that_stops_heartbeating_sees_heartbeat_timeout(make_server, processes) -> None:
    server: InProcess = await make_server(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    proc = spawn(processes, "tests.contract.broken_worker", "--connect", f"127.0.0.1:{server.server.port}",
                 "--fault", "no-heartbeat")
    _, stderr = await asyncio.wait_for(asyncio.to_thread(proc.communicate), 20)
    # Not a normal close (OK, no message): a status, a reason and the hub's why.
    assert "the hub ended the stream: UNAVAILABLE HEARTBEAT_TIMEOUT: no heartbeat for " in stderr.decode()


async def test_a_stopped_codelane_worker_is_dropped_and_comes_back(make_server, processes) -> None:
    server: InProcess = await make_server(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    proc = spawn_worker(processes, server.server.port, "silent")
    await server.client.wait_workers("silent")
    proc.send_signal(signal.SIGSTOP)  # alive, its stream open, but it says nothing
    await poll_until(lambda: server.server.pool.worker("silent") is None, what="the hub to lose the worker")
    proc.send_signal(signal.SIGCONT)

    def ended_line() -> str:
        while line := proc.stderr.readline().decode():
            if "ended our stream" in line:
                return line
        raise AssertionError("the worker's stderr ended")

    # What it logs names the status (the reason too, unless its own heartbeat write raced the
    # hub's status: grpc-python then reports INTERNAL, see docs/protocol.md).
    assert "ended our stream (" in await asyncio.wait_for(asyncio.to_thread(ended_line), 20)
    await server.client.wait_workers("silent")


# -- cancel -----------------------------------------------------------------------------------------


async def test_a_cancelled_call_records_the_worker_that_ran_it(make_server, workspace: Path, tmp_path: Path) -> None:
    server: InProcess = await make_server(local_workers=1, local_worker_tools=[PLUGIN], local_fallback=False)
    client = server.client
    await client.wait_workers("local-1")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("sleep", "c_long", ms=600_000)]}, {"text": "x"}])
    session = await client.create(workspace, model)
    turn = client.send_stream(session.session_id, "go")
    await read_until(turn, lambda r: kind(r.event) == "tool_call_started", [])
    assert await client.cancel(session.session_id)
    rest = [r.event for r in await read_rest(turn)]

    result = finished(rest)["c_long"]
    assert result.error_kind == tools_pb2.ERROR_KIND_CANCELLED
    assert result.worker_id == "local-1" and result.attempt == 1
    assert "while running on local-1" in result.output
    [message] = [m for m in await client.history(session.session_id) if m.tool_call_id == "c_long"]
    assert message.tool_result.worker_id == "local-1"

    async def slot_freed() -> bool:
        [worker] = (await client.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT)).workers
        return worker.in_flight == 0

    await poll_until(slot_freed, what="the worker to answer the Cancel")  # it still answered


# -- what WorkerLost says ---------------------------------------------------------------------------


async def test_kill9_of_a_worker_is_reported_as_a_broken_connection(
    make_server, workspace: Path, tmp_path: Path, processes
) -> None:
    server: InProcess = await make_server(local_fallback=False)
    client = server.client
    proc = spawn_worker(processes, server.server.port, "doomed")
    await client.wait_workers("doomed")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("sleep", "c1", ms=600_000)]}, {"text": "x"}])
    session = await client.create(workspace, model)
    turn = client.send_stream(session.session_id, "go")
    await read_until(turn, lambda r: kind(r.event) == "tool_call_started", [])
    proc.kill()
    seen: list = []
    lost = await read_until(turn, lambda r: kind(r.event) == "worker_lost", seen)
    assert lost.event.worker_lost.worker_id == "doomed"
    # What the hub observed: usually the write it tries fails (a broken connection); when the
    # transport accepts that write before it notices the peer is gone, it can only say that the
    # stream ended without Draining, and that the connection may have dropped. Never a plain
    # "the worker closed its stream".
    assert lost.event.worker_lost.reason in (BROKEN, HALF_CLOSED), lost.event.worker_lost.reason
    turn.cancel()


async def test_a_worker_half_closing_without_draining_is_reported_so(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    worker, turn = await echo_turn_on_raw_worker(make_server, workspace, tmp_path, "quitter")
    assert (await worker.read()).HasField("assignments")
    worker.half_close()
    lost = await read_until(turn, lambda r: kind(r.event) == "worker_lost", [])
    assert lost.event.worker_lost.reason == HALF_CLOSED
    await read_rest(turn)
    # worker.proto, Connect: a Cancel of no call (how the hub tells a half-close from a dead
    # connection), then the end of the stream, OK as after a drain.
    cancel = await worker.read()
    assert cancel.HasField("cancel") and cancel.cancel.dispatch_id == ""
    assert await asyncio.wait_for(worker.stream.read(), RPC_TIMEOUT) is grpc.aio.EOF
    assert await worker.stream.code() == grpc.StatusCode.OK



async def test_a_worker_answering_without_dispatch_ids_is_told_to_upgrade_and_its_call_goes_elsewhere(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A worker from before dispatch ids (releases before 2026-12-03) answers by call_id only: the
    # hub dropped every result it sent, silently, and each call it was given waited for its
    # deadline (60 s for a Query call) and ended "timed out on worker ..." while it stayed ready.
    older, turn = await echo_turn_on_raw_worker(make_server, workspace, tmp_path, "older")
    [assign] = (await older.read()).assignments.assigns
    older.outbox.put_nowait(worker_pb2.ConnectRequest(results=worker_pb2.CallResults(results=[
        worker_pb2.CallResult(call_id=assign.call_id, attempt=assign.attempt,
                              result=tools_pb2.ToolResult(output="hi"))])))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await older.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without a dispatch_id" in ended.value.details() and "upgrade" in ended.value.details()
    newer = RawWorker(older.client, "newer", echo_spec())
    assert (await newer.read()).HasField("welcome")
    [retried] = (await newer.read()).assignments.assigns
    newer.answer(retried.dispatch_id, tools_pb2.ToolResult(output="hi"))
    result = finished([r.event for r in await read_rest(turn)])["c1"]
    assert not result.is_error and result.worker_id == "newer" and result.attempt == 2, result
    newer.half_close()


# -- no worker to run it ----------------------------------------------------------------------------


async def test_read_with_no_worker_and_no_local_fallback_says_no_worker_is_there(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(local_fallback=False)
    client = server.client
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", "c1", file_path="README.md")]},
                                {"text": "x"}])
    session = await client.create(workspace, model)
    result = finished(await client.send(session.session_id, "go"))["c1"]
    assert result.error_kind == tools_pb2.ERROR_KIND_NO_WORKER
    assert "no connected tool worker offers it" in result.output
    assert "codelane worker --connect" in result.output
    assert "unknown tool" not in result.output


# -- a workspace that keeps changing ----------------------------------------------------------------


async def test_a_call_whose_snapshot_keeps_changing_announces_only_the_retries_it_makes(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    worker, turn = await echo_turn_on_raw_worker(make_server, workspace, tmp_path, "changing")
    assigned = 0
    while assigned < MAX_SNAPSHOTS_PER_CALL:
        message = await worker.read()
        for assign in message.assignments.assigns:
            assigned += 1
            worker.answer(assign.dispatch_id, SNAPSHOT_CHANGED)
    events = [r.event for r in await read_rest(turn)]

    attempts = [e.tool_call_started.attempt for e in events if kind(e) == "tool_call_started"]
    retries = [e.call_retried.attempt for e in events if kind(e) == "call_retried"]
    assert attempts == list(range(1, MAX_SNAPSHOTS_PER_CALL + 1))
    assert retries == list(range(2, MAX_SNAPSHOTS_PER_CALL + 1))  # none after the last attempt
    result = finished(events)["c1"]
    assert result.error_kind == tools_pb2.ERROR_KIND_SNAPSHOT_CHANGED and result.attempt == MAX_SNAPSHOTS_PER_CALL


async def test_a_call_sent_again_for_its_snapshot_keeps_its_retries_for_a_lost_worker(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # Attempts count on across a call's sends on newer snapshots, and the pool's retry budget
    # counted them too: with max_attempts 2, a call sent once more for its snapshot had no retry
    # left when its worker was then lost, and ended in error though another worker was there.
    changing, turn = await echo_turn_on_raw_worker(make_server, workspace, tmp_path, "changing",
                                                   queue=session_pb2.QueueConfig(max_attempts=2))
    [assign] = (await changing.read()).assignments.assigns
    changing.answer(assign.dispatch_id, SNAPSHOT_CHANGED)
    [again] = (await changing.read()).assignments.assigns
    assert again.attempt == 2
    other = RawWorker(changing.client, "other", echo_spec())
    assert (await other.read()).HasField("welcome")
    changing.half_close()  # lost with the call in flight
    [retried] = (await other.read()).assignments.assigns
    other.answer(retried.dispatch_id, tools_pb2.ToolResult(output="hi"))
    result = finished([r.event for r in await read_rest(turn)])["c1"]
    assert not result.is_error and result.output == "hi" and result.attempt == 3, result
    other.half_close()


async def test_a_snapshot_not_ready_within_the_calls_deadline_ends_the_call(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(local_fallback=False)
    client = server.client
    worker = RawWorker(client, "waiting", echo_spec())
    assert (await worker.read()).HasField("welcome")
    # A sparse GiB: hashing it takes far longer than the call's 50 ms, on any machine.
    (workspace / "huge.bin").touch()
    os.truncate(workspace / "huge.bin", 1 << 30)
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("echo", "c1", text="hi")]}, {"text": "x"}])
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(
        lane=tools_pb2.LANE_QUERY, timeout=duration_pb2.Duration(nanos=50_000_000))])
    session = await client.create(workspace, model, queue=queue)
    events = await client.send(session.session_id, "go")

    result = finished(events)["c1"]
    assert result.error_kind == tools_pb2.ERROR_KIND_TIMEOUT
    assert "snapshot for a worker was not ready within the call's 0.05s" in result.output, result.output
    assert kind(events[-1]) == "turn_finished"


async def test_a_codelane_worker_whose_id_is_taken_retries_and_says_so_once(make_server, processes) -> None:
    # Until ID_TAKEN_PATIENCE passes (its own earlier stream may still be held), a worker whose id
    # another live worker has retries; it logged a WARNING at every attempt of the backoff.
    server: InProcess = await make_server()
    holder = RawWorker(server.client, "w-taken", echo_spec())
    assert (await holder.read()).HasField("welcome")
    proc = spawn(processes, "tool_worker", "--connect", f"127.0.0.1:{server.server.port}", "--id", "w-taken",
                 "--log-level", "DEBUG")

    lines = await asyncio.wait_for(asyncio.to_thread(_lines_holding, proc, "is held by a connected worker", 3), 60)
    assert len(lines) == 3, lines
    assert " worker WARNING " in lines[0] and lines[0].endswith("; retrying\n"), lines
    assert all(" worker DEBUG " in line for line in lines[1:]), lines
    assert proc.poll() is None
    holder.half_close()
