"""The worker pool with real worker processes over loopback gRPC."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health

from codelane.v1 import admin_pb2, admin_pb2_grpc, tools_pb2, worker_pb2, worker_pb2_grpc, workspace_pb2
from session_server.api import hub
from session_server.pool import QueryCall
from session_server.pool.workers import MAX_ROOT_BYTES, MAX_WORKSPACE_ROOTS
from tests.polling import poll_until
from tests.pool.conftest import pid_alive, wait_for
from tests.processes import all_gone, pids_with
from tool_worker.merkle import SnapshotRef, snapshot_of
from tool_worker.telemetry.endpoints import serve_health
from tool_worker.tools.base import ErrorKind


@dataclass(frozen=True)
class CallStarted:
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class CallRetried:
    attempt: int
    previous_worker_id: str


@dataclass(frozen=True)
class WorkerLost:
    worker_id: str
    reason: str


class Placements:
    """A call's PlacementObserver that records what the pool reported, into a list."""

    def __init__(self, into: list) -> None:
        self.into = into

    def assigned(self, worker_id: str, attempt: int) -> None:
        self.into.append(CallStarted(worker_id, attempt))

    def lost(self, worker_id: str, reason: str, next_attempt: int | None) -> None:
        self.into.append(WorkerLost(worker_id, reason))
        if next_attempt is not None:
            self.into.append(CallRetried(next_attempt, worker_id))


def call(
    workspace: Path,
    tool: str,
    args: dict,
    *,
    session: str = "s1",
    call_id: str = "c1",
    timeout: float = 30.0,
    events: list | None = None,
) -> QueryCall:
    return QueryCall(
        session_id=session,
        call_id=call_id,
        tool_name=tool,
        arguments_json=json.dumps(args),
        workspace=str(workspace),
        timeout=timeout,
        observer=Placements(events) if events is not None else None,
        snapshot=snapshot_of(str(workspace)),
    )


async def connected(server, *worker_ids: str) -> None:
    await wait_for(lambda: {w.worker_id for w in server.pool.workers()} >= set(worker_ids), what=f"{worker_ids}")


async def test_label_routing_sends_gpu_tool_only_to_gpu_worker(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    workers.spawn(server.port, "cpu-1")
    workers.spawn(server.port, "gpu-1", labels="gpu=true")
    await connected(server, "cpu-1", "gpu-1")
    results = await asyncio.gather(
        *(server.pool.dispatch(call(tmp_path, "gpu_info", {}, call_id=f"g{i}")) for i in range(6))
    )
    assert {r.worker_id for r in results} == {"gpu-1"}
    assert not any(r.is_error for r in results)


async def test_slots_are_never_exceeded(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    workers.spawn(server.port, "w1", slots=2)
    workers.spawn(server.port, "w2", slots=3)
    await connected(server, "w1", "w2")
    # Each call sleeps long enough that a worker's slots fill before the first of them ends: at
    # 40 ms, a worker paused that long between reading its Assigns could see fewer at once than its slots.
    results = await asyncio.gather(
        *(server.pool.dispatch(call(tmp_path, "sleep", {"ms": 200}, call_id=f"c{i}")) for i in range(30))
    )
    assert not any(r.is_error for r in results), [r.output for r in results if r.is_error]
    concurrent_seen = {}
    for r in results:
        concurrent_seen[r.worker_id] = max(concurrent_seen.get(r.worker_id, 0), r.metadata["concurrent"])
    # Measured on the workers themselves, and by the hub's own count.
    assert concurrent_seen["w1"] <= 2 and concurrent_seen["w2"] <= 3
    assert concurrent_seen["w1"] == 2 and concurrent_seen["w2"] == 3  # slots were used, too
    snapshots = {w.worker_id: w for w in server.pool.workers()}
    assert snapshots["w1"].max_in_flight_seen == 2 and snapshots["w2"].max_in_flight_seen == 3


async def test_a_flooding_session_does_not_starve_another(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    workers.spawn(server.port, "w1", slots=2)
    await connected(server, "w1")
    finished: list[str] = []  # sessions, in the order their calls ended (not times: no clock)

    async def run(session: str, call_id: str) -> None:
        result = await server.pool.dispatch(call(tmp_path, "sleep", {"ms": 30}, session=session, call_id=call_id))
        assert not result.is_error, result.output
        finished.append(session)

    flood = [asyncio.create_task(run("A", f"a{i}")) for i in range(50)]
    # All of A's 50 calls reach the pool first (2 run, the rest wait), which a fixed sleep only
    # hoped for; checked every loop turn, as the pool takes a call in the turn its task starts.
    await poll_until(lambda: len(server.pool.waiting()) + server.pool.in_flight("w1") + len(finished) == 50,
                     what="A's 50 calls to reach the pool", interval=0)
    await asyncio.gather(run("B", "b1"), run("B", "b2"), *flood)
    # Round-robin: B's two calls are among the first few to end, not behind A's queue.
    b_last = max(i for i, session in enumerate(finished) if session == "B")
    assert b_last < len(finished) // 3, finished


async def test_kill_9_mid_call_retries_on_another_worker(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    workers.spawn(server.port, "w1", slots=1)
    workers.spawn(server.port, "w2", slots=1)
    await connected(server, "w1", "w2")
    events: list = []
    task = asyncio.create_task(server.pool.dispatch(call(tmp_path, "sleep", {"ms": 1500}, events=events)))
    await wait_for(lambda: any(isinstance(e, CallStarted) for e in events), what="the call to start")
    first = next(e for e in events if isinstance(e, CallStarted))
    workers.kill9(first.worker_id)
    result = await asyncio.wait_for(task, 10)
    assert not result.is_error, result.output
    assert result.attempt == 2
    assert result.worker_id != first.worker_id
    retried = [e for e in events if isinstance(e, CallRetried)]
    assert retried and retried[0].attempt == 2 and retried[0].previous_worker_id == first.worker_id


async def test_all_workers_gone_ends_calls_with_errors_within_the_bound(make_server, workers, tmp_path: Path) -> None:
    server = await make_server(no_worker_wait=1.0)
    workers.spawn(server.port, "w1", slots=2)
    workers.spawn(server.port, "w2", slots=2)
    await connected(server, "w1", "w2")
    events: list = []
    tasks = [
        asyncio.create_task(
            server.pool.dispatch(call(tmp_path, "sleep", {"ms": 20000}, call_id=f"c{i}", events=events))
        )
        for i in range(4)
    ]
    await wait_for(lambda: sum(isinstance(e, CallStarted) for e in events) >= 4, what="calls to start")
    workers.kill9("w1")
    workers.kill9("w2")
    # No clock: the calls' own 20 s sleeps and deadlines cannot end them as NO_WORKER, only the
    # pool's wait for a worker, which says how long it waited (a wall-clock bound on a loaded
    # machine was a flake, not a check).
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert all(r.is_error and r.error_kind is ErrorKind.NO_WORKER for r in results), [r.output for r in results]
    assert "waited 1s" in results[0].output


async def test_drain_finishes_running_calls_then_the_worker_leaves(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    proc = workers.spawn(server.port, "w1", slots=2)
    workers.spawn(server.port, "w2", slots=2)
    await connected(server, "w1", "w2")
    events: list = []
    running = asyncio.create_task(server.pool.dispatch(call(tmp_path, "sleep", {"ms": 800}, events=events)))
    await wait_for(lambda: bool(events), what="the call to start")
    started_on = events[0].worker_id
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        reply = await admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id=started_on))
        assert reply.worker.state == admin_pb2.WORKER_STATE_DRAINING
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    other = "w2" if started_on == "w1" else "w1"
    # New calls avoid the draining worker.
    more = await asyncio.gather(*(server.pool.dispatch(call(tmp_path, "noop", {}, call_id=f"n{i}")) for i in range(4)))
    assert {r.worker_id for r in more} == {other}
    result = await running
    assert not result.is_error and result.worker_id == started_on
    drained = workers.procs[started_on]
    assert await asyncio.to_thread(drained.wait, 10) == 0
    await wait_for(lambda: started_on not in {w.worker_id for w in server.pool.workers()}, what="the worker to leave")
    assert proc is not None


async def test_worker_reconnects_after_a_hub_restart(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    port = server.port
    workers.spawn(port, "w1")
    await connected(server, "w1")
    await server.stop(grace=0.2)
    again = await make_server(listen=f"127.0.0.1:{port}")
    await connected(again, "w1")
    result = await again.pool.dispatch(call(tmp_path, "noop", {}))
    assert not result.is_error and result.worker_id == "w1"


async def test_cancelling_a_call_kills_its_tool_process_on_the_worker(
    make_server, workers, tmp_path: Path, mark: str
) -> None:
    server = await make_server()
    workers.spawn(server.port, "w1")
    await connected(server, "w1")
    task = asyncio.create_task(server.pool.dispatch(call(tmp_path, "sleep_process", {"ms": 60000, "mark": mark})))
    await wait_for(lambda: bool(pids_with(mark)), what="the tool process")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_gone(mark), "the tool process outlived its cancelled call"
    # The slot comes back once the worker confirms.
    await wait_for(lambda: server.pool.workers()[0].in_flight == 0, what="the slot to be released")


async def test_a_tools_own_timeout_on_a_worker_ends_only_that_call(make_server, workers, tmp_path: Path) -> None:
    # An idle worker runs a lone call in the task that read it (a new task takes over the
    # reading): the tool's asyncio.timeout() must still end the call alone, not the stream.
    server = await make_server()
    workers.spawn(server.port, "w1")
    await connected(server, "w1")
    events: list = []
    args = {"ms": 10000, "mark": "codelane-test-sleep", "timeout_ms": 300}
    result = await server.pool.dispatch(call(tmp_path, "sleep_process", args, events=events))
    # Its own 300 ms, not the 10 s sleep nor the call's deadline, ended it: the message says so
    # (no wall-clock bound, which a loaded machine's pauses can pass).
    assert result.is_error and result.error_kind is ErrorKind.TIMEOUT, result.output
    assert "timed out after 300 ms" in result.output and result.worker_id == "w1"
    after = await server.pool.dispatch(call(tmp_path, "noop", {}, call_id="c2", events=events))
    assert not after.is_error and after.worker_id == "w1"
    assert [type(e).__name__ for e in events] == ["CallStarted", "CallStarted"]


async def test_lone_calls_and_batches_alternate_without_loss(make_server, workers, tmp_path: Path) -> None:
    # A lone call on an idle worker runs in its reader's task; calls that arrive together run
    # in tasks of their own. Switching between the two must lose nothing.
    server = await make_server()
    workers.spawn(server.port, "w1", slots=4)
    await connected(server, "w1")
    for round_ in range(30):
        alone = await server.pool.dispatch(call(tmp_path, "noop", {}, call_id=f"a{round_}"))
        assert not alone.is_error, alone.output
        together = await asyncio.gather(
            *(server.pool.dispatch(call(tmp_path, "sleep", {"ms": 2}, call_id=f"b{round_}-{i}")) for i in range(6))
        )
        assert all(not r.is_error for r in together), [r.output for r in together if r.is_error]
    assert server.pool.workers()[0].in_flight == 0


async def test_a_call_past_its_deadline_names_the_worker_and_time(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    workers.spawn(server.port, "w1")
    await connected(server, "w1")
    result = await server.pool.dispatch(call(tmp_path, "sleep", {"ms": 5000}, timeout=0.3))
    assert result.is_error and result.error_kind is ErrorKind.TIMEOUT
    assert "w1" in result.output and "0.3s" in result.output


def _hello(**overrides) -> worker_pb2.ConnectRequest:
    spec = tools_pb2.ToolSpec(name="read", parameters_json_schema="{}", lane=tools_pb2.LANE_QUERY, idempotent=True)
    hello = worker_pb2.Hello(worker_id="raw", slots=1, tools=[spec])
    for key, value in overrides.items():
        if key == "tools":
            del hello.tools[:]
            hello.tools.extend(value)
        elif key == "labels":
            hello.labels.update(value)
        elif key == "workspace_roots":
            hello.workspace_roots.extend(value)
        else:
            setattr(hello, key, value)
    return worker_pb2.ConnectRequest(hello=hello)


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [
        (_hello(tools=[]), "at least one tool"),
        (_hello(slots=0), "at least 1 slot"),
        (_hello(tools=[tools_pb2.ToolSpec(name="grep", lane=tools_pb2.LANE_QUERY)] * 2), "twice"),
        (_hello(worker_id=""), "worker_id is empty"),
        (worker_pb2.ConnectRequest(heartbeat=worker_pb2.Heartbeat()), "must be a Hello"),
        # Checked on the event loop, each schema about a millisecond: 20,000 stood it still 14 s.
        (_hello(tools=[tools_pb2.ToolSpec(name=f"t{i}", parameters_json_schema="{}", lane=tools_pb2.LANE_QUERY)
                       for i in range(257)]), "at most 256"),
        (_hello(labels={"blob": "x" * (1024 * 1024)}), "at most 1,048,576"),
        (_hello(tools=[tools_pb2.ToolSpec(name="Bad Name!", parameters_json_schema="{}", lane=tools_pb2.LANE_QUERY)]),
         "not 1-64 letters"),
        (_hello(tools=[tools_pb2.ToolSpec(name="deploy", parameters_json_schema="{}", lane=tools_pb2.LANE_EXECUTE)]),
         "Query tools only"),
        # Nested deeper than the interpreter's stack: json.loads, then jsonschema's check, raised
        # RecursionError, which no handler took (the worker saw UNKNOWN, "Unexpected error").
        # Python 3.13's parser reads 5,000 levels, and any depth that fits in a spec's 16 KiB:
        # there the list is refused for not being an object.
        (_hello(tools=[tools_pb2.ToolSpec(name="deep", parameters_json_schema="[" * 5_000 + "]" * 5_000,
                                          lane=tools_pb2.LANE_QUERY)]),
         "must be a JSON object" if sys.version_info >= (3, 13) else "nested too deeply"),
        (_hello(tools=[tools_pb2.ToolSpec(name="deep", parameters_json_schema='{"not": ' * 900 + "{}" + "}" * 900,
                                          lane=tools_pb2.LANE_QUERY)]), "nested too deeply"),
        # Longer than Python reads an integer: the message was Python's own, about sys.set_int_max_str_digits.
        (_hello(tools=[tools_pb2.ToolSpec(name="huge", parameters_json_schema='{"maximum": ' + "9" * 5000 + "}",
                                          lane=tools_pb2.LANE_QUERY)]), "'huge': parameters_json_schema holds an "
                                                                        "integer of more than 4,300 digits"),
        # Routing compares a call's workspace with every root of every worker, on the event loop:
        # 100,000 short roots (under 1 MB) cost each call to be placed about a second.
        (_hello(workspace_roots=[f"/r{i}" for i in range(MAX_WORKSPACE_ROOTS + 1)]), "at most 64 roots"),
        (_hello(workspace_roots=["/" + "r" * MAX_ROOT_BYTES]), "longer than"),
        # Compared with the server's absolute workspace paths: a relative root never covered one,
        # and was taken without a word.
        (_hello(workspace_roots=["/srv", "srv/ws"]), "hello.workspace_roots: 'srv/ws' is not an absolute path"),
        (_hello(workspace_roots=[""]), "hello.workspace_roots: '' is not an absolute path"),
    ],
    ids=["no-tools", "zero-slots", "duplicate-tools", "no-id", "not-hello", "too-many-tools", "too-big",
         "bad-name", "execute-lane", "deep-json", "deep-schema", "huge-integer", "too-many-roots", "long-root",
         "relative-root", "empty-root"],
)
async def test_bad_hello_is_invalid_argument(make_server, request_message, expected: str) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await stream.write(request_message)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stream.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in error.value.details()
    assert server.pool.workers() == []


@pytest.mark.parametrize("half_close", [False, True], ids=["silent", "half-closed"])
async def test_a_stream_without_a_hello_is_told_why(make_server, monkeypatch, half_close: bool) -> None:
    # A stream that sent nothing for the Hello deadline, or half-closed without a message, was
    # told "the first message of Connect must be a Hello", as if it had sent something else.
    monkeypatch.setattr(hub, "HELLO_TIMEOUT", 0.2)
    server = await make_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        if half_close:
            await stream.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(stream.read(), 10)
        # A Hello late on a slow link is worth another attempt; a stream that ended without one is not.
        assert error.value.code() == (grpc.StatusCode.INVALID_ARGUMENT if half_close else grpc.StatusCode.UNAVAILABLE)
        expected = "ended before its Hello" if half_close else "no Hello within 0.2s"
        assert expected in error.value.details(), error.value.details()
    assert server.pool.workers() == []


async def test_wrong_worker_token_is_unauthenticated_and_the_worker_exits(make_server, workers) -> None:
    server = await make_server(worker_token="s3cret")
    proc = workers.spawn(server.port, "w1", token="wrong")
    code = await asyncio.to_thread(proc.wait, 15)
    stderr = proc.stderr.read().decode()
    assert code == 3
    assert "UNAUTHENTICATED" in stderr and "wrong worker bearer token" in stderr
    # One line: a refusal that came out of the Hello's write was taken for a broken stream first.
    assert "retrying" not in stderr and "UNAUTHENTICATED UNAUTHENTICATED" not in stderr, stderr
    good = workers.spawn(server.port, "w2", token="s3cret")
    await connected(server, "w2")
    assert good.poll() is None


async def test_roots_limit_shared_mode_and_a_workspace_elsewhere_is_synced(make_server, workers, tmp_path: Path) -> None:  # noqa: E501
    server = await make_server()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "project").mkdir(parents=True)
    (elsewhere / "project" / "b.txt").write_text("inside the root\n")
    workers.spawn(server.port, "w1", roots=(str(elsewhere),))
    await connected(server, "w1")
    outside = tmp_path / "ws"
    outside.mkdir()
    (outside / "a.txt").write_text("outside the root\n")
    digests = {}
    for workspace, name, text in ((outside, "a.txt", "outside the root"), (elsewhere / "project", "b.txt", "inside")):
        current = await server.snapshots.of(str(workspace)).current()
        digests[str(workspace)] = current.digest.hash
        result = await server.pool.dispatch(QueryCall(
            session_id="s1", call_id="c1", tool_name="read", workspace=str(workspace),
            arguments_json=json.dumps({"file_path": str(workspace / name)}),  # absolute: mapped to the copy
            snapshot=SnapshotRef(str(workspace), current.digest, current.times_digest),
        ))
        assert not result.is_error and result.worker_id == "w1" and text in result.output, result.output
    async with grpc.aio.insecure_channel(server.address) as channel:
        listed = await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(admin_pb2.ListWorkersRequest())
    held = {v.workspace: v for v in listed.workers[0].workspaces}
    assert held[str(outside)].mode == workspace_pb2.WORKSPACE_MODE_SYNCED
    assert held[str(elsewhere / "project")].mode == workspace_pb2.WORKSPACE_MODE_SHARED
    assert {ws: v.root_digest.hash for ws, v in held.items()} == digests
    assert all(v.visible for v in held.values())


async def test_results_are_never_stranded_behind_heartbeat_writes(make_server, workers, tmp_path: Path) -> None:
    # Heartbeats every 5 ms keep the worker's stream busy: a result finishing during one must
    # still be sent (it once waited for the next result, forever when none came).
    server = await make_server(heartbeat_interval=0.005)
    workers.spawn(server.port, "w1", slots=1)
    await connected(server, "w1")
    for i in range(300):
        result = await server.pool.dispatch(call(tmp_path, "noop", {}, call_id=f"n{i}", timeout=5))
        assert not result.is_error, result.output


async def test_a_local_worker_leaves_when_its_server_process_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A parent that starts a worker against a dead address, then exits without cleaning up.
    script = (
        "import subprocess, sys, os;"
        "p = subprocess.Popen([sys.executable, '-m', 'tool_worker', '--connect', '127.0.0.1:9',"
        " '--id', 'orphan', '--parent-pid', str(os.getpid())]);"
        "print(p.pid, flush=True)"
    )
    parent = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    worker_pid = int(parent.stdout.strip())
    await wait_for(lambda: not pid_alive(worker_pid), within=10, what="the orphaned worker to exit")


async def _draining_during_a_call(server, workers, tmp_path: Path, ms: int):
    """A worker w1 running a `sleep` of `ms` when it is sent SIGTERM, once the hub has heard that
    it drains: its process, the call's events and the task awaiting the call's result."""
    proc = workers.spawn(server.port, "w1", slots=1)
    await connected(server, "w1")
    events: list = []
    running = asyncio.create_task(server.pool.dispatch(call(tmp_path, "sleep", {"ms": ms}, events=events)))
    try:
        await wait_for(lambda: bool(events), what="the call to start")
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: server.pool.workers()[0].draining, what="the worker to say it drains")
    except BaseException:
        running.cancel()
        raise
    return proc, events, running


async def test_sigterm_drains_the_worker_then_it_exits_0(make_server, workers, tmp_path: Path) -> None:
    server = await make_server()
    # The call outlasts the way from its start to the hub hearing that the worker drains (with
    # 700 ms a loaded machine could end it first, and the worker then left before it was seen).
    proc, _, running = await _draining_during_a_call(server, workers, tmp_path, 3000)
    result = await running
    assert not result.is_error and result.worker_id == "w1"
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_a_second_signal_stops_a_draining_worker_at_once(make_server, workers, tmp_path: Path) -> None:
    # A drain waits for the running calls however long they take: the operator is told so, and a
    # second signal (Ctrl-C twice) stops the worker as a kill would, its call left to the hub.
    server = await make_server()
    proc, events, running = await _draining_during_a_call(server, workers, tmp_path, 600_000)
    try:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 10) == 128 + signal.SIGINT
        await wait_for(lambda: any(isinstance(e, WorkerLost) for e in events), what="the hub to lose the worker")
    finally:
        running.cancel()
    stderr = proc.stderr.read().decode()
    assert "SIGTERM: draining: no new calls; exiting once the 1 running call(s) end" in stderr
    assert "SIGINT again: stopping now, leaving 1 running call(s) to the hub" in stderr
    assert "Traceback" not in stderr


async def test_a_draining_worker_whose_hub_stops_exits_without_a_retry(make_server, workers, tmp_path: Path) -> None:
    # A server that stops its local workers (SIGTERM: drain), then ends their streams: each
    # worker logged a WARNING "ended our stream (...): retrying" on its way out (grpc.aio often
    # reports INTERNAL "Internal error from Core" there), though it retried nothing.
    server = await make_server()
    proc, _, running = await _draining_during_a_call(server, workers, tmp_path, 600_000)
    try:
        await server.stop(grace=1)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        running.cancel()
    stderr = proc.stderr.read().decode()
    assert "ended our stream while this worker stops" in stderr, stderr
    assert "retrying" not in stderr and " WARNING " not in stderr and "Traceback" not in stderr, stderr


async def test_a_silent_worker_is_lost_and_its_calls_move(make_server, workers, tmp_path: Path) -> None:
    # The call outlasts the test's way from its start to the SIGSTOP (300 ms once did not, on a
    # loaded machine: the call ended on its first worker); the other worker must outlast a
    # loaded machine's pauses too, hence a timeout of 10 heartbeats.
    server = await make_server(heartbeat_interval=0.2, heartbeat_timeout=2.0)
    workers.spawn(server.port, "w1", slots=1)
    workers.spawn(server.port, "w2", slots=1)
    await connected(server, "w1", "w2")
    events: list = []
    task = asyncio.create_task(server.pool.dispatch(call(tmp_path, "sleep", {"ms": 3000}, events=events)))
    await wait_for(lambda: bool(events), what="the call to start")
    frozen = workers.procs[events[0].worker_id]
    frozen.send_signal(signal.SIGSTOP)  # alive, stream open, but silent
    try:
        result = await asyncio.wait_for(task, 30)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert not result.is_error and result.attempt == 2 and result.worker_id != events[0].worker_id
    lost = [e for e in events if type(e).__name__ == "WorkerLost"]
    assert lost and "no heartbeat" in lost[0].reason


async def test_queue_stats_count_calls_and_latencies(make_server, workers, tmp_path: Path) -> None:
    from session_server.calls import ToolCall
    from session_server.events import CallInfo
    from session_server.scheduler import TurnScheduler
    from tool_worker.tools.base import Lane, ToolSpec

    server = await make_server()
    workers.spawn(server.port, "w1", slots=2)
    await connected(server, "w1")

    async def execute(tool_call: ToolCall):
        arguments = json.loads(tool_call.info.arguments_json)
        return await server.pool.dispatch(call(tmp_path, tool_call.tool_name, arguments, call_id=tool_call.call_id))

    def sleep_call(index: int, ms: int) -> ToolCall:
        spec = ToolSpec("sleep", "", {}, Lane.QUERY, True)
        info = CallInfo(f"c{index}", "sleep", json.dumps({"ms": ms}), "query", index)
        return ToolCall(info, lambda event: None, spec=spec, stats=server.stats)

    scheduler = TurnScheduler(execute, query_concurrency=4)
    calls = [sleep_call(i, 20) for i in range(5)]
    calls.append(sleep_call(5, -1))  # invalid: fails
    results = await scheduler.run_all(calls)
    assert [r.is_error for r in results] == [False] * 5 + [True]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stats = await admin_pb2_grpc.AdminServiceStub(channel).GetQueueStats(admin_pb2.GetQueueStatsRequest())
    query = next(lane for lane in stats.lanes if lane.lane == tools_pb2.LANE_QUERY)
    assert (query.completed, query.failed, query.pending, query.active) == (5, 1, 0, 0)
    assert 0 < query.latency_p50.ToNanoseconds() <= query.latency_p99.ToNanoseconds()
    assert stats.workers == 1 and stats.worker_slots == 2 and stats.worker_in_flight == 0
    lanes = {lane.lane for lane in stats.lanes}
    assert lanes == {tools_pb2.LANE_QUERY, tools_pb2.LANE_EXECUTE, tools_pb2.LANE_GENERATE}


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_workers_connect_over_tls(make_server, workers, tmp_path: Path) -> None:
    cert, key = await asyncio.to_thread(_self_signed, tmp_path)
    server = await make_server(tls_cert=str(cert), tls_key=str(key))
    workers.spawn(server.port, "tls-1", host="localhost", extra=("--tls-ca", str(cert)))
    await connected(server, "tls-1")
    result = await server.pool.dispatch(call(tmp_path, "noop", {}))
    assert not result.is_error and result.worker_id == "tls-1"


async def test_a_result_the_wire_cannot_carry_reaches_the_hub_as_a_whole_error(
    make_server, workers, tmp_path: Path
) -> None:
    # The worker added the result to its next message, then failed half-way through encoding it:
    # the hub recorded "looks fine" as a success, its metadata and exit code missing.
    server = await make_server()
    workers.spawn(server.port, "w1", extra=("--tools", "tests.pool.unencodable_tools"))
    await connected(server, "w1")
    # The registry now finds such a result before the wire does, and says what is wrong with it.
    for tool, problem in (("tuple_key", "metadata JSON cannot write"), ("huge_exit_code", "not a 32-bit int")):
        result = await server.pool.dispatch(call(tmp_path, tool, {}, call_id=tool))
        assert result.error_kind is ErrorKind.INTERNAL, (tool, result)
        assert f"{tool} failed: the tool returned" in result.output and problem in result.output
    # Its slots were all answered: the next call runs.
    again = await server.pool.dispatch(call(tmp_path, "tuple_key", {}, call_id="again"))
    assert again.error_kind is ErrorKind.INTERNAL


async def test_a_worker_with_no_hub_to_reach_says_why_once_not_at_every_attempt(tmp_path: Path) -> None:
    # It logged "hub at ... ended our stream (UNAVAILABLE: failed to connect ...)" at every
    # attempt, for ever, though there never was a stream.
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{port}", "--id", "lonely",
        "--cache-dir", str(tmp_path / "cache"), "--log-level", "DEBUG", stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []

    async def attempts(count: int) -> None:
        while sum("retrying" in line for line in lines) < count:
            line = await proc.stderr.readline()
            assert line, f"the worker exited: {lines}"
            lines.append(line.decode())

    try:
        await asyncio.wait_for(attempts(4), 60)
    finally:
        proc.kill()
        await proc.wait()
    warnings = [line for line in lines if "WARNING" in line and "retrying" in line]
    assert len(warnings) == 1 and f"nothing listens at 127.0.0.1:{port}" in warnings[0], lines


async def test_a_worker_pointed_at_another_grpc_service_says_so(tmp_path: Path) -> None:
    # A server's health port (or any other gRPC service): the worker said "ended our stream
    # (UNIMPLEMENTED: Method not found!)", where the CLI says which port to give instead.
    side, port = await serve_health("127.0.0.1:0", health.aio.HealthServicer())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{port}", "--id", "astray",
        "--cache-dir", str(tmp_path / "cache"), stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None

    async def retrying() -> str:
        while line := (await proc.stderr.readline()).decode():
            if "retrying" in line:
                return line
        raise AssertionError("the worker exited")

    try:
        line = await asyncio.wait_for(retrying(), 60)
    finally:
        proc.kill()
        await proc.wait()
        await side.stop(None)
    assert f"WARNING 127.0.0.1:{port} answers gRPC but has no codelane worker hub (UNIMPLEMENTED: " in line, line
    assert "is it a server's --health-listen port, or another service?" in line


async def test_results_past_the_wire_limit_are_sent_as_the_hub_keeps_them(make_server, workers, tmp_path: Path) -> None:
    # A plugin's 68 MiB output, and 17 results of 4 MiB finishing together (one CallResults
    # message of 68 MiB), passed gRPC's 64 MiB limit: the worker's write failed, its stream broke,
    # and every call on it was lost. A worker now sends what the hub keeps, a few results a message.
    server = await make_server()
    workers.spawn(server.port, "w1", slots=17)
    await connected(server, "w1")
    [before] = server.pool.workers()
    emoji = "\N{GRINNING FACE}"  # 4 bytes in UTF-8
    [huge] = await asyncio.gather(server.pool.dispatch(call(
        tmp_path, "bulky", {"chars": 17 * 1024 * 1024, "char": emoji, "metadata_chars": 10**6}, call_id="huge")))
    assert not huge.is_error and huge.truncated
    assert huge.output.startswith(emoji * 1000) and "cut by codelane" in huge.output
    assert "omitted_by_codelane" in huge.metadata
    many = await asyncio.gather(*(server.pool.dispatch(call(
        tmp_path, "bulky", {"chars": 1024 * 1024, "char": emoji}, call_id=f"m{i}")) for i in range(17)))
    assert all(not r.is_error and r.output == emoji * 1024 * 1024 for r in many), [r.output[:200] for r in many]
    [after] = server.pool.workers()
    assert after.connected_at == before.connected_at and all(r.attempt == 1 for r in [huge, *many])
