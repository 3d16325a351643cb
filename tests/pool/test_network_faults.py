"""A worker on another host over a network that fails badly (tests/hosts.py: a network namespace
behind a veth link): the link goes down silently (no FIN, no RST), comes back, drops and delays
packets; the server restarts while the link is down. The hub notices a lost worker within its
heartbeat timeout, ends or moves its calls as documented (docs/protocol.md, "Loss and retries"),
and the worker comes back by itself. Needs root and iproute2; skipped with the reason elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from session_server.api import hub
from session_server.pool import QueryCall
from tests.hosts import TestHost, test_host
from tests.pool.conftest import wait_for
from tests.pool.test_pool_e2e import CallRetried, CallStarted, Placements, WorkerLost
from tests.session.conftest import Client, call, collect, kind, scripted
from tool_worker.merkle import snapshot_of
from tool_worker.tools.base import ErrorKind

__all__ = ["test_host"]

TOKEN = "worker-secret"
PLUGIN = "benchmarks.plugin_tools"


def remote_argv(server, host: TestHost, worker_id: str, cache: Path, slots: int = 2) -> list[str]:
    return ["--connect", f"{host.server_address}:{server.ports[1]}", "--token", TOKEN, "--id", worker_id,
            "--slots", str(slots), "--tools", PLUGIN, "--cache-dir", str(cache)]


def sleep_call(workspace: Path, ms: int, call_id: str, events: list, *, idempotent: bool = True,
               timeout: float = 60.0) -> QueryCall:
    return QueryCall(
        session_id="s1", call_id=call_id, tool_name="sleep", arguments_json=json.dumps({"ms": ms}),
        workspace=str(workspace), idempotent=idempotent, timeout=timeout, observer=Placements(events),
        snapshot=snapshot_of(str(workspace)),
    )


def listed(server) -> set[str]:
    return {w.worker_id for w in server.pool.workers()}


def spawn_remote(host: TestHost, server, tmp_path: Path, worker_id: str = "remote", slots: int = 2):
    """The worker on the other host (its cache there; the workspace it sees is the server's, as
    through a shared mount)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(exist_ok=True)
    return host.spawn_worker(remote_argv(server, host, worker_id, tmp_path / f"cache-{worker_id}", slots), hide=hidden)


async def remote_server(make_server, host: TestHost, **overrides):
    return await make_server(extra_listen=[f"{host.server_address}:0"], worker_token=TOKEN, **overrides)


async def test_a_link_gone_silent_loses_the_worker_and_its_calls_move_or_end(
    make_server, workers, test_host: TestHost, tmp_path: Path
) -> None:
    server = await remote_server(make_server, test_host, heartbeat_interval=0.3, heartbeat_timeout=3.0,
                                 no_worker_wait=5.0)
    spawn_remote(test_host, server, tmp_path)
    await wait_for(lambda: "remote" in listed(server), within=30, what="the remote worker")
    events_a: list = []
    events_b: list = []
    again = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 2000, "idem", events_a)))
    once = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 2000, "once", events_b, idempotent=False)))
    await wait_for(lambda: events_a and events_b, what="both calls to start on the remote worker")
    workers.spawn(server.port, "local", slots=2, token=TOKEN)
    await wait_for(lambda: "local" in listed(server), what="the local worker")
    test_host.link_down()
    # The remote calls end within the link's silence: their results stay in the remote's buffers.
    first, second = await asyncio.wait_for(asyncio.gather(again, once), 30)
    assert not first.is_error and first.worker_id == "local" and first.attempt == 2, first
    assert second.is_error and second.error_kind is ErrorKind.WORKER_LOST and "not idempotent" in second.output
    assert [e for e in events_b if isinstance(e, CallRetried)] == []
    assert any(isinstance(e, WorkerLost) and "no heartbeat" in e.reason for e in events_a), events_a
    assert listed(server) == {"local"}
    test_host.link_up()
    # Back by itself; the results its old stream still carried change nothing.
    await wait_for(lambda: "remote" in listed(server), within=90, what="the remote worker to reconnect")
    workers.kill9("local")
    await wait_for(lambda: listed(server) == {"remote"}, what="the local worker to go")
    events: list = []
    result = await asyncio.wait_for(server.pool.dispatch(sleep_call(tmp_path, 10, "after", events)), 30)
    assert not result.is_error and result.worker_id == "remote", result
    assert first.worker_id == "local" and second.error_kind is ErrorKind.WORKER_LOST
    assert [e for e in events if isinstance(e, CallStarted)] == [CallStarted("remote", 1)]


async def test_a_blackholed_link_shorter_than_the_timeout_loses_nothing_and_runs_each_call_once(
    make_server, test_host: TestHost, tmp_path: Path
) -> None:
    server = await remote_server(make_server, test_host, heartbeat_interval=0.3, heartbeat_timeout=6.0)
    spawn_remote(test_host, server, tmp_path)
    await wait_for(lambda: "remote" in listed(server), within=30, what="the remote worker")
    events: list = []
    task = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 1500, "c1", events, idempotent=False)))
    await wait_for(lambda: events, what="the call to start")
    test_host.blackhole()
    # Silent for a while, but within the timeout: the hub waits (and ListWorkers still lists it).
    await wait_for(lambda: time.time() - server.pool.worker("remote").last_seen > 2.0, what="two seconds of silence")
    assert "remote" in listed(server)
    test_host.clear()
    result = await asyncio.wait_for(task, 30)
    assert not result.is_error and result.worker_id == "remote" and result.attempt == 1, result
    assert events == [CallStarted("remote", 1)]


@pytest.mark.parametrize("cut", ["link_down", "blackhole"])
async def test_the_server_restarting_while_the_link_is_down_gets_the_worker_back(
    make_server, test_host: TestHost, tmp_path: Path, cut: str
) -> None:
    server = await remote_server(make_server, test_host)
    spawn_remote(test_host, server, tmp_path)
    await wait_for(lambda: "remote" in listed(server), within=30, what="the remote worker")
    events: list = []
    running = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 30_000, "c1", events)))
    await wait_for(lambda: events, what="the call to start")
    getattr(test_host, cut)()
    # The old server stops (its FIN and RST never reach the worker), a new one listens on the
    # same ports: the worker's connection is half open, to a server that no longer exists.
    await server.stop(grace=0.5)
    result = await asyncio.wait_for(running, 10)
    assert result.is_error and result.error_kind is ErrorKind.CANCELLED, result
    again = await make_server(listen=f"127.0.0.1:{server.ports[0]}", extra_listen=[f"{test_host.server_address}:"
                              f"{server.ports[1]}"], worker_token=TOKEN)
    assert listed(again) == set()
    test_host.link_up() if cut == "link_down" else test_host.clear()
    await wait_for(lambda: "remote" in listed(again), within=90, what="the worker to reach the new server")
    events = []
    result = await asyncio.wait_for(again.pool.dispatch(sleep_call(tmp_path, 10, "c2", events)), 30)
    assert not result.is_error and result.worker_id == "remote", result


@contextlib.asynccontextmanager
async def _two_sleeps_on_the_remote_worker(
    make_server, test_host: TestHost, tmp_path: Path, ms: int, no_worker_wait: float
) -> AsyncIterator[tuple[Any, Client, Any]]:
    """A server whose turn's two sleep calls (a, b) both run on the test host's worker: the
    server, a client of it, and the turn's SendMessage stream."""
    model = scripted(tmp_path, [
        {"tool_calls": [call("sleep", "a", ms=ms), call("sleep", "b", ms=ms)]},
        {"text": "done"},
    ])
    server = await remote_server(make_server, test_host, heartbeat_interval=0.3, heartbeat_timeout=3.0,
                                 no_worker_wait=no_worker_wait, model=model, local_fallback=False,
                                 data_dir=tmp_path / "data")
    client = Client(f"127.0.0.1:{server.port}")
    try:
        spawn_remote(test_host, server, tmp_path)
        await client.wait_workers("remote", within=30)
        session = await client.create(tmp_path)
        stream = client.send_stream(session.session_id, "sleep twice")
        await wait_for(lambda: server.pool.in_flight("remote") == 2, what="both calls on the remote worker")
        yield server, client, stream
    finally:
        await client.close()


async def test_a_turn_whose_worker_goes_silent_ends_with_turn_finished_and_list_workers_follows(
    make_server, test_host: TestHost, tmp_path: Path
) -> None:
    async with _two_sleeps_on_the_remote_worker(make_server, test_host, tmp_path, 60_000, 2.0) as (_, client, stream):
        test_host.link_down()
        events = [item.event for item in await collect(stream, 60)]
        kinds = [kind(e) for e in events]
        assert kinds[-1] == "turn_finished" and kinds.count("tool_call_finished") == 2, kinds
        lost = [e.worker_lost for e in events if kind(e) == "worker_lost"]
        assert lost and lost[0].worker_id == "remote" and "no heartbeat" in lost[0].reason, lost
        results = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
        assert all(r.is_error for r in results), results
        assert await client.worker_ids() == set()
        test_host.link_up()
        await client.wait_workers("remote", within=90)


async def test_a_connection_that_times_out_under_a_long_heartbeat_timeout_comes_back_and_runs_nothing_twice(
    make_server, test_host: TestHost, tmp_path: Path
) -> None:
    # The hub waits far longer than the connection takes to time out (gRPC's keepalive and TCP's
    # user timeout, on both ends): the stream breaks before any heartbeat is missed, and the
    # worker reconnects, on its token if the hub still holds the old stream, anew if not.
    server = await remote_server(make_server, test_host, heartbeat_interval=2.0, heartbeat_timeout=600.0,
                                 no_worker_wait=600.0)
    worker = spawn_remote(test_host, server, tmp_path)
    await wait_for(lambda: "remote" in listed(server), within=30, what="the remote worker")
    first = server.pool.worker("remote").connected_at
    events_a: list = []
    events_b: list = []
    again = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 120_000, "idem", events_a)))
    once = asyncio.create_task(server.pool.dispatch(sleep_call(tmp_path, 120_000, "once", events_b, idempotent=False)))
    await wait_for(lambda: events_a and events_b, what="both calls to start on the remote worker")
    test_host.blackhole()
    try:
        await asyncio.wait_for(asyncio.to_thread(read_until, worker, b"ended our stream"), 120)
    finally:
        test_host.clear()
    await wait_for(lambda: (w := server.pool.worker("remote")) is not None and w.connected_at > first, within=120,
                   what="the worker's new stream")
    second = await asyncio.wait_for(once, 30)
    assert second.is_error and second.error_kind is ErrorKind.WORKER_LOST and "not idempotent" in second.output
    assert [e for e in events_b if isinstance(e, CallRetried)] == []
    # The idempotent call runs again, once, on the new stream (the worker ended the old run).
    await wait_for(lambda: CallStarted("remote", 2) in events_a, what="the retry")
    assert server.pool.in_flight("remote") == 1 and [e for e in events_a if isinstance(e, CallStarted)] == [
        CallStarted("remote", 1), CallStarted("remote", 2)]
    # The worker ended the calls of the stream it lost (their results could not be sent): a sleep
    # now runs beside the retry alone.
    probe = await asyncio.wait_for(server.pool.dispatch(sleep_call(tmp_path, 10, "probe", [])), 30)
    assert probe.worker_id == "remote" and probe.metadata["concurrent"] == 2, probe
    again.cancel()


async def test_a_hello_the_link_delays_past_the_hello_deadline_is_retried_not_fatal(
    make_server, monkeypatch: pytest.MonkeyPatch, test_host: TestHost, tmp_path: Path
) -> None:
    # The worker's Hello (kilobytes of tool specs) takes seconds over a 16 kbit/s link: past the
    # hub's deadline, here 1 s rather than 10 to keep the link fast enough to connect at all.
    monkeypatch.setattr(hub, "HELLO_TIMEOUT", 1.0)
    server = await remote_server(make_server, test_host)
    test_host.throttle("16kbit")
    worker = spawn_remote(test_host, server, tmp_path)
    try:
        # A link, not the worker, was at fault: it must try again (it exited 2, "the hub rejected
        # this worker (INVALID_ARGUMENT)", a worker gone for good over a slow minute).
        line = await asyncio.wait_for(asyncio.to_thread(read_until, worker, b"HELLO_TIMEOUT"), 60)
        assert b"retrying" in line and worker.poll() is None, line
    finally:
        test_host.clear()
    await wait_for(lambda: "remote" in listed(server), within=60, what="the worker once the link is fast again")


def read_until(process, marker: bytes) -> bytes:
    """The stderr line of `process` holding `marker` (blocking: run it in a thread)."""
    said = []
    for line in process.stderr:
        if marker in line:
            return line
        said.append(line)
    raise AssertionError(f"{marker!r} never said; it exited {process.wait()} after: {b''.join(said[-5:])!r}")


async def test_a_turn_whose_worker_goes_silent_has_its_calls_retried_on_another_in_event_order(
    make_server, workers, test_host: TestHost, tmp_path: Path
) -> None:
    async with _two_sleeps_on_the_remote_worker(make_server, test_host, tmp_path, 3000, 5.0) as (server, client,
                                                                                                 stream):
        workers.spawn(server.port, "local", slots=2, token=TOKEN)
        await client.wait_workers("local")
        test_host.link_down()
        events = [item.event for item in await collect(stream, 60)]
        test_host.link_up()
        kinds = [kind(e) for e in events]
        assert kinds[-1] == "turn_finished" and kinds.count("turn_finished") == 1, kinds
        for call_id in ("a", "b"):
            mine = [(kind(e), getattr(e, kind(e))) for e in events if concerns(e, call_id)]
            seen = [(k, getattr(x, "worker_id", "") or getattr(x, "previous_worker_id", ""), getattr(x, "attempt", 0))
                    for k, x in mine]
            assert [k for k, _, _ in seen] == ["tool_call_started", "worker_lost", "call_retried",
                                                "tool_call_started", "tool_call_finished"], seen
            assert seen[0][1:] == ("remote", 1) and seen[2][1:] == ("remote", 2) and seen[3][1:] == ("local", 2), seen
            finished = mine[-1][1].result
            assert not finished.is_error and finished.worker_id == "local" and finished.attempt == 2, finished


def concerns(event, call_id: str) -> bool:
    """Whether a call's event (started, lost, retried, finished) is one of `call_id`'s."""
    body = getattr(event, kind(event))
    if kind(event) == "tool_call_started":
        return body.call.call_id == call_id
    if kind(event) == "worker_lost":
        return call_id in body.call_ids
    return kind(event) in ("call_retried", "tool_call_finished") and body.call_id == call_id


@pytest.mark.parametrize("spec", ["delay 1500ms 500ms", "delay 500ms loss 25%"])
async def test_latency_and_loss_end_every_call_by_its_deadline_and_never_run_one_twice(
    make_server, test_host: TestHost, tmp_path: Path, spec: str
) -> None:
    reason = test_host.netem(spec)
    if reason is not None:
        pytest.skip(reason)
    server = await remote_server(make_server, test_host, heartbeat_interval=2.0, heartbeat_timeout=6.0,
                                 no_worker_wait=5.0)
    spawn_remote(test_host, server, tmp_path, slots=4)
    await wait_for(lambda: "remote" in listed(server), within=90, what="the remote worker")
    events: dict[str, list] = {f"c{i}": [] for i in range(8)}
    calls = [sleep_call(tmp_path, 200, call_id, seen, idempotent=i % 2 == 0, timeout=30.0)
             for i, (call_id, seen) in enumerate(events.items())]
    late = sleep_call(tmp_path, 60_000, "late", [], timeout=4.0)
    started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(server.pool.dispatch(c) for c in [*calls, late])), 90)
    # Nothing hangs: the sleep past its deadline ends as a timeout, the others by theirs.
    assert results[-1].error_kind is ErrorKind.TIMEOUT, results[-1]
    assert time.monotonic() - started < 30.0 + 10.0
    for c, result in zip(calls, results, strict=False):
        retried = [e for e in events[c.call_id] if isinstance(e, CallRetried)]
        if not c.idempotent:
            # At most once: a lost worker's call of a tool that is not idempotent is never sent again.
            assert retried == [] and (not result.is_error or result.error_kind is ErrorKind.WORKER_LOST), result
        else:
            assert not result.is_error or result.error_kind in (ErrorKind.WORKER_LOST, ErrorKind.NO_WORKER), result
