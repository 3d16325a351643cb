"""Every long-lived loop contains its own failures and goes on: the event bus, the event log's
commit, the hub's reader (with a real worker process), and the worker's read loop (against a
hub that sends it nonsense). Each test injects the failure."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from codelane.v1 import tools_pb2, worker_pb2, worker_pb2_grpc, workspace_pb2
from session_server.bus import EventBus
from session_server.eventlog import EventLog
from session_server.events import StoredEvent, TextDelta
from session_server.metrics import ServerMetrics
from session_server.pool import QueryCall
from session_server.server import CodelaneServer, ServerConfig
from session_server.store import EventPage, SessionRecord, Store
from tests.polling import poll_until
from tool_worker import snapshot_wire
from tool_worker.merkle import snapshot_of

BOUND = 15.0


def spawn_worker(address: str, worker_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tool_worker", "--connect", address, "--id", worker_id],
                            stderr=subprocess.DEVNULL)


async def _first(batches):
    async for batch in batches:
        yield batch
        return


def _event(sequence: int) -> StoredEvent:
    return StoredEvent("s1", sequence, 1.0, "t1", TextDelta(f"d{sequence}", 0))


async def test_one_broken_subscriber_does_not_stop_the_bus() -> None:
    bus = EventBus(lambda session, after: EventPage([], more=False, chars=0))
    broken, healthy = bus.subscribe("s1", 0), bus.subscribe("s1", 0)

    def explode(events, size) -> None:
        raise RuntimeError("this subscriber's buffer is broken")

    broken._offer = explode
    bus.publish_many([_event(1), _event(2)])
    [batch] = [batch async for batch in _first(healthy.batches())]
    assert [event.sequence for event in batch] == [1, 2]


def _one_session_log(tmp_path: Path) -> tuple[Store, EventLog, Any]:
    """A store holding session s1, its event log, and a subscription to s1's events."""
    store = Store(tmp_path / "db")
    store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
    bus = EventBus(store.event_page)
    return store, EventLog(store, bus), bus.subscribe("s1", 0)


async def test_a_failed_commit_is_retried_and_nothing_is_sent_before_it_is_stored(tmp_path: Path) -> None:
    store, log, subscription = _one_session_log(tmp_path)
    real_append = store.append_events
    failures = []

    def disk_full_once(events):
        if not failures:
            failures.append(len(events))
            raise OSError(28, "No space left on device")
        return real_append(events)

    store.append_events = disk_full_once
    log.append("s1", "t1", TextDelta("a", 0))
    log.append("s1", "t1", TextDelta("b", 0))
    received = []
    async for batch in subscription.batches():
        for event in batch:
            received.append((event.sequence, event.payload.text))
            assert store.last_sequence("s1") >= event.sequence  # stored before it was sent
        if len(received) == 2:
            break
    assert failures == [2]
    assert received == [(1, "a"), (2, "b")]
    assert [e.sequence for e in store.events_after("s1")] == [1, 2]
    store.close()


async def test_after_a_flush_stores_what_a_failed_commit_left_the_log_flushes_on_its_own(tmp_path: Path) -> None:
    # A turn that ends calls flush(), which may store what a failed commit left before the retry
    # runs (the disk has room again): the log must go back to committing each loop turn's events
    # by itself, or the next turn's events wait, unsent, for the next flush() of all.
    store, log, subscription = _one_session_log(tmp_path)
    real_append = store.append_events
    full = True
    failures = []

    def append(events):
        if full:
            failures.append(len(events))
            raise OSError(28, "No space left on device")
        return real_append(events)

    store.append_events = append
    log.append("s1", "t1", TextDelta("a", 0))
    await poll_until(lambda: failures, what="the commit to fail")
    full = False
    log.flush()
    log.append("s1", "t1", TextDelta("b", 0))
    received = []

    async def receive_both() -> None:
        async for batch in subscription.batches():
            received.extend(event.payload.text for event in batch)
            if len(received) == 2:
                return

    await asyncio.wait_for(receive_both(), BOUND)
    assert received == ["a", "b"]
    assert [e.sequence for e in store.events_after("s1")] == [1, 2]
    store.close()


async def test_the_hubs_reader_survives_a_message_the_pool_chokes_on(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("still here\n")
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "d", local_workers=0,
                                         heartbeat_interval=0.1, heartbeat_timeout=5.0))
    await server.start()
    worker = spawn_worker(f"127.0.0.1:{server.port}", "w1")
    try:
        real_heartbeat, choked = server.pool.heartbeat, asyncio.Event()

        def choke_once(worker_id, link):
            if not choked.is_set():
                choked.set()
                raise RuntimeError("injected: the pool choked on a heartbeat")
            real_heartbeat(worker_id, link)

        server.pool.heartbeat = choke_once
        await poll_until(lambda: server.pool.worker("w1") is not None, within=BOUND, what="the worker")
        connected_at = server.pool.worker("w1").connected_at
        await asyncio.wait_for(choked.wait(), BOUND)
        call = QueryCall(session_id="s", call_id="c", tool_name="read", arguments_json=json.dumps(
            {"file_path": "a.txt"}), workspace=str(tmp_path / "ws"), timeout=BOUND,
            snapshot=snapshot_of(str(tmp_path / "ws")))
        result = await server.pool.dispatch(call)
        assert not result.is_error and result.worker_id == "w1" and "still here" in result.output
        assert server.pool.worker("w1").connected_at == connected_at  # the same stream, never dropped
    finally:
        worker.kill()
        worker.wait()
        await server.stop(grace=0.5)


class _NonsenseHub(worker_pb2_grpc.WorkerHubServiceServicer):
    """Sends a worker what no sane hub would, then one good call."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.results: asyncio.Queue[worker_pb2.CallResult] = asyncio.Queue()

    async def Connect(self, request_iterator, context):
        hello = await anext(request_iterator)
        yield worker_pb2.ConnectResponse(welcome=worker_pb2.Welcome(worker_id=hello.hello.worker_id))
        yield worker_pb2.ConnectResponse(cancel=worker_pb2.Cancel(dispatch_id="never-assigned"))
        snapshot = workspace_pb2.WorkspaceSnapshot()
        snapshot_wire.set_snapshot(snapshot, snapshot_of(str(self.workspace)))
        yield worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(assigns=[
            worker_pb2.Assign(dispatch_id="d0", tool_name="read", workspace="/no/such/dir"),  # no snapshot
            worker_pb2.Assign(dispatch_id="d1", tool_name="no_such_tool", workspace=str(self.workspace),
                              snapshot=snapshot),
            worker_pb2.Assign(dispatch_id="d2", tool_name="read", workspace=str(self.workspace),
                              arguments_json="{not json", snapshot=snapshot),
        ]))
        yield worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(assigns=[
            worker_pb2.Assign(dispatch_id="d3", tool_name="read", workspace=str(self.workspace),
                              arguments_json=json.dumps({"file_path": "a.txt"}), snapshot=snapshot),
        ]))
        async for message in request_iterator:
            for result in message.results.results:
                await self.results.put(result)


async def test_the_workers_loops_answer_nonsense_and_go_on(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine\n")
    hub = _NonsenseHub(tmp_path)
    grpc_server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    worker = spawn_worker(f"127.0.0.1:{port}", "w")
    try:
        results = {}
        while len(results) < 4:
            result = await asyncio.wait_for(hub.results.get(), BOUND)
            results[result.dispatch_id] = result.result
    finally:
        worker.kill()
        worker.wait()
        await grpc_server.stop(0)
    assert results["d0"].is_error and "names no valid snapshot" in results["d0"].output
    assert results["d1"].error_kind == tools_pb2.ERROR_KIND_UNKNOWN_TOOL
    assert results["d2"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert not results["d3"].is_error and "fine" in results["d3"].output


async def test_events_the_store_drops_for_a_deleted_session_are_not_counted_stored(tmp_path: Path) -> None:
    # A session deleted between an append and its commit: the store drops its events, and the
    # metrics counted them stored all the same.
    store = Store(tmp_path / "db")
    try:
        store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
        store.create_session(SessionRecord(session_id="s2", workspace=str(tmp_path)))
        metrics = ServerMetrics()
        log = EventLog(store, EventBus(store.event_page), metrics=metrics)
        log.append("s1", "t1", TextDelta("kept", 0))
        log.append("s2", "t2", TextDelta("dropped", 0))
        store.delete_session("s2")
        log.flush()
        assert metrics.registry.get_sample_value("codelane_events_appended_total") == 1
        assert [e.sequence for e in store.events_after("s1")] == [1]
    finally:
        store.close()
