"""The worker hub's boundary, played by an attacker: who may join as a worker, whose id it may
take, what a worker does with an Assign outside its --root, and TLS for local and remote
workers. Real servers and real worker processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.transport import CHANNEL_OPTIONS
from codelane.v1 import tools_pb2, worker_pb2, worker_pb2_grpc
from session_server.main import main as server_main
from session_server.pool import QueryCall
from session_server.server import CodelaneServer, ServerConfig, UnsafeConfig
from tests.certs import make_certs
from tests.polling import poll_until
from tests.session.conftest import error_details
from tool_worker import snapshot_wire, wire
from tool_worker.merkle import snapshot_of
from tool_worker.tools.read import TOOL as READ
from tool_worker.worker import (
    DEFAULT_HEARTBEAT_INTERVAL,
    MAX_HEARTBEAT_INTERVAL,
    MIN_HEARTBEAT_INTERVAL,
    heartbeat_interval,
)

BOUND = 20.0


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[list[CodelaneServer]]:
    started: list[CodelaneServer] = []
    yield started
    for server in started:
        await server.stop(grace=0.5)


async def start(servers: list[CodelaneServer], tmp_path: Path, **overrides) -> CodelaneServer:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / f"data-{len(servers)}", local_workers=0,
                          heartbeat_interval=0.5, heartbeat_timeout=3.0)
    for key, value in overrides.items():
        setattr(config, key, value)
    server = CodelaneServer(config)
    await server.start()
    servers.append(server)
    return server


async def connected(server: CodelaneServer, worker_ids: list[str], what: str) -> None:
    """Waits until exactly these workers are connected (a connection raises no event a test sees)."""
    await poll_until(lambda: [w.worker_id for w in server.pool.workers()] == worker_ids, what=what, within=BOUND)


def worker_process(address: str, worker_id: str, *extra: str, token: str | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tool_worker", "--connect", address, "--id", worker_id, *extra]
    env = {k: v for k, v in os.environ.items() if k != "CODELANE_WORKER_TOKEN"}
    if token:
        env["CODELANE_WORKER_TOKEN"] = token
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)


async def exit_of(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), BOUND)
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise AssertionError("the worker kept retrying instead of exiting") from None
    return code, proc.stderr.read()


def read_call(workspace: Path, file_path: str, session: str = "s1") -> QueryCall:
    return QueryCall(session_id=session, call_id="c1", tool_name="read",
                     arguments_json=json.dumps({"file_path": file_path}), workspace=str(workspace), timeout=BOUND,
                     snapshot=snapshot_of(str(workspace)))


async def test_a_server_that_requires_client_tokens_admits_no_worker_without_one(servers, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("hello\n")
    server = await start(servers, tmp_path, token="client-secret", local_workers=1)
    await connected(server, ["local-1"], "the local worker")

    rogue = worker_process(f"127.0.0.1:{server.port}", "rogue")
    code, stderr = await exit_of(rogue)
    assert code == 3 and "UNAUTHENTICATED" in stderr
    assert [w.worker_id for w in server.pool.workers()] == ["local-1"]
    # The local worker got a token of its own and serves the calls.
    result = await server.pool.dispatch(read_call(tmp_path / "ws", "a.txt"))
    assert not result.is_error and result.worker_id == "local-1"


async def _hello(channel: grpc.aio.Channel, worker_id: str, token: str, reconnect_token: str = ""):
    call = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect(metadata=(("authorization", f"Bearer {token}"),))
    await call.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
        worker_id=worker_id, slots=1, tools=[wire.spec_to_proto(READ.spec)], reconnect_token=reconnect_token,
    )))
    return call


async def test_a_worker_with_the_token_cannot_take_a_live_workers_id(servers, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("the real file\n")
    server = await start(servers, tmp_path, worker_token="w-secret")
    honest = worker_process(f"127.0.0.1:{server.port}", "w1", token="w-secret")
    try:
        await connected(server, ["w1"], "the honest worker")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
            for guess in ("", "a-guessed-reconnect-token"):
                rogue = await _hello(channel, "w1", "w-secret", guess)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(rogue.read(), BOUND)
                error = error_details(caught.value)
                assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "WORKER_ID_TAKEN"
        # The honest worker kept its stream, and the calls go to it.
        [info] = server.pool.workers()
        assert info.worker_id == "w1" and info.peer.startswith("ipv4:")
        result = await server.pool.dispatch(read_call(tmp_path / "ws", "a.txt"))
        assert not result.is_error and "the real file" in result.output and result.worker_id == "w1"
    finally:
        honest.kill()
        honest.wait()


async def test_a_reconnecting_worker_takes_its_id_back_and_the_old_stream_is_fenced(servers, tmp_path: Path) -> None:
    server = await start(servers, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        first = await _hello(channel, "w1", "")
        welcome = (await asyncio.wait_for(first.read(), BOUND)).welcome
        assert welcome.reconnect_token and welcome.heartbeat_timeout.seconds == 3
        second = await _hello(channel, "w1", "", welcome.reconnect_token)
        assert (await asyncio.wait_for(second.read(), BOUND)).HasField("welcome")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await asyncio.wait_for(first.read(), BOUND)
        assert error_details(caught.value).reason == "WORKER_REPLACED"
        second.cancel()


async def test_a_reconnect_token_is_one_shot_and_one_the_hub_never_gave_is_ignored_on_a_free_id(
    servers, tmp_path: Path
) -> None:
    # What worker.proto says of Hello.reconnect_token, held.
    server = await start(servers, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        # A token from a hub that has since restarted (this one never gave it): the id is free,
        # so the Hello is taken as a first connection, without a word about the token.
        first = await _hello(channel, "w1", "", "a-token-of-the-hub-before-its-restart")
        token = (await asyncio.wait_for(first.read(), BOUND)).welcome.reconnect_token
        second = await _hello(channel, "w1", "", token)
        renewed = (await asyncio.wait_for(second.read(), BOUND)).welcome.reconnect_token
        assert renewed and renewed != token
        # The token used once takes the id no more: only the newest Welcome's does.
        again = await _hello(channel, "w1", "", token)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(again.read(), BOUND)
        assert error_details(caught.value).reason == "WORKER_ID_TAKEN"
        first.cancel()
        second.cancel()


# ConnectRequest{hello{worker_id=<ff fe fd>}}: a string field of bad UTF-8; then bytes that are no
# protobuf at all.
_UNDECODABLE_HELLO = b"\x0a\x05\x0a\x03\xff\xfe\xfd"
_CORRUPT = b"\xff\xff\xff\xff"


def _raw_connect(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A Connect stream whose requests are sent as the bytes given, parsed or not."""
    method = channel.stream_stream("/codelane.v1.WorkerHubService/Connect", request_serializer=lambda raw: raw,
                                   response_deserializer=worker_pb2.ConnectResponse.FromString)
    return method()


def _connect_errors_logged(caplog) -> list[logging.LogRecord]:
    # (Only this stream's: the loops of earlier tests can leave gRPC's poller errors of their own.)
    return [r for r in caplog.records if r.levelno >= logging.ERROR and "WorkerHubService/Connect" in r.getMessage()]


@pytest.mark.parametrize("first", [_UNDECODABLE_HELLO, _CORRUPT], ids=["bad-utf8", "corrupt"])
async def test_a_first_message_that_does_not_parse_is_an_invalid_hello(
    servers, tmp_path: Path, caplog, first: bytes
) -> None:
    # gRPC's parse error escaped the hub: UNKNOWN "Unexpected <class DecodeError>", a traceback.
    server = await start(servers, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        call = _raw_connect(channel)
        await call.write(first)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), BOUND)
    error = error_details(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HELLO"), error
    assert "must be a Hello" in error.message and "does not parse" in error.message
    assert server.pool.workers() == [] and not _connect_errors_logged(caplog), caplog.text


async def test_a_message_that_does_not_parse_after_the_welcome_ends_the_stream_invalid_argument(
    servers, tmp_path: Path, caplog
) -> None:
    # The hub dropped the worker but ended its stream OK, the status of a drained worker: the
    # worker was never told, and would have taken its end for a normal one.
    server = await start(servers, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        call = _raw_connect(channel)
        await call.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id="w1", slots=1, tools=[wire.spec_to_proto(READ.spec)])).SerializeToString())
        assert (await asyncio.wait_for(call.read(), BOUND)).HasField("welcome")
        await call.write(b"\x12\x05\x0a\x03\x22\x01\xff")  # results{results{dispatch_id=<ff>}}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(BOUND):
                while (await call.read()) is not grpc.aio.EOF:
                    pass
    error = error_details(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), error
    assert "does not parse" in error.message and "UTF-8" in error.message
    assert server.pool.workers() == [] and not _connect_errors_logged(caplog), caplog.text


class _FakeHub(worker_pb2_grpc.WorkerHubServiceServicer):
    """A hub that says whatever it likes: here, Assigns outside the worker's --root."""

    def __init__(self, assigns: list[worker_pb2.Assign]) -> None:
        self.assigns = assigns
        self.results: asyncio.Queue[worker_pb2.CallResult] = asyncio.Queue()

    async def Connect(self, request_iterator, context):
        hello = await anext(request_iterator)
        yield worker_pb2.ConnectResponse(welcome=worker_pb2.Welcome(worker_id=hello.hello.worker_id))
        yield worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(assigns=self.assigns))
        async for message in request_iterator:
            for result in message.results.results:
                await self.results.put(result)


async def test_a_worker_never_reads_its_own_files_outside_its_root_whatever_the_hub_says(tmp_path: Path) -> None:
    # The hub names the exact snapshot of a directory outside the worker's root: the worker must
    # not use its own copy of that path (roots limit shared mode); it asks the hub's CAS, which
    # this hub does not serve, so the call fails without the secret.
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-CONTENT\n")
    (root / "sneaky").symlink_to(outside)  # inside the root by name, outside it in fact
    assigns = []
    for i, workspace in enumerate((outside, root / "sneaky")):
        assign = worker_pb2.Assign(dispatch_id=f"d{i}", call_id="c", attempt=1, tool_name="read",
                                   workspace=str(workspace), arguments_json=json.dumps({"file_path": "secret.txt"}))
        snapshot_wire.set_snapshot(assign.snapshot, snapshot_of(str(workspace)))
        assigns.append(assign)
    hub = _FakeHub(assigns)
    async with _fake_hub(hub) as address:
        worker = worker_process(address, "w1", "--root", str(root), "--cache-dir", str(tmp_path / "cache"))
        try:
            results = [await asyncio.wait_for(hub.results.get(), BOUND) for _ in assigns]
        finally:
            worker.kill()
            worker.wait()
    assert sorted(r.dispatch_id for r in results) == ["d0", "d1"]
    for result in results:
        assert result.result.is_error and "was not run on this worker" in result.result.output
        assert "fetching the snapshot" in result.result.output
        assert "TOP-SECRET" not in result.result.output


class _CreditBreakingHub(worker_pb2_grpc.WorkerHubServiceServicer):
    """A hub that ignores the worker's credit: one message of more calls than its slots, one
    dispatch id twice; then, once those are answered, one more call."""

    def __init__(self) -> None:
        self.results: list[worker_pb2.CallResult] = []
        self.done = asyncio.Event()

    @staticmethod
    def _assign(dispatch_id: str) -> worker_pb2.Assign:
        # No snapshot: the worker answers without awaiting anything, so every call started from
        # one message is answered before the worker reads the next one.
        return worker_pb2.Assign(dispatch_id=dispatch_id, call_id=f"c-{dispatch_id}", attempt=1, tool_name="read",
                                 workspace="/nowhere", arguments_json=json.dumps({"file_path": "x"}))

    async def Connect(self, request_iterator, context):
        hello = await anext(request_iterator)
        yield worker_pb2.ConnectResponse(welcome=worker_pb2.Welcome(worker_id=hello.hello.worker_id))
        yield worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(
            assigns=[self._assign("d0"), self._assign("d0"), self._assign("d1")]))
        sent_last = False
        async for message in request_iterator:
            self.results.extend(message.results.results)
            answered = {r.dispatch_id for r in self.results}
            if not sent_last and {"d0", "d1"} <= answered:
                sent_last = True
                yield worker_pb2.ConnectResponse(assignments=worker_pb2.Assignments(assigns=[self._assign("d2")]))
            if "d2" in answered:
                self.done.set()


async def test_a_worker_holds_to_its_slots_and_runs_a_dispatch_id_once_whatever_the_hub_sends(tmp_path: Path) -> None:
    # Before: the worker started every Assign it was sent (a hostile hub could make it run any
    # number at once) and a repeated dispatch id ran twice, answered twice, the first run beyond
    # any Cancel.
    hub = _CreditBreakingHub()
    async with _fake_hub(hub) as address:
        worker = worker_process(address, "w1", "--slots", "1", "--cache-dir", str(tmp_path / "cache"))
        try:
            await asyncio.wait_for(hub.done.wait(), BOUND)
        finally:
            worker.kill()
            worker.wait()
    by_id = {r.dispatch_id: r.result for r in hub.results}
    assert sorted(r.dispatch_id for r in hub.results) == ["d0", "d1", "d2"]  # d0 once
    assert hub.results[-1].dispatch_id == "d2"
    assert by_id["d1"].error_kind == tools_pb2.ERROR_KIND_AT_CAPACITY
    assert "at most 1 calls at once" in by_id["d1"].output
    for ran in ("d0", "d2"):  # run, and refused by the tool itself (no snapshot), not by the credit
        assert by_id[ran].error_kind == tools_pb2.ERROR_KIND_INTERNAL and "names no valid snapshot" in by_id[ran].output


async def test_a_one_slot_worker_given_call_after_call_by_the_real_hub_refuses_none(servers, tmp_path: Path) -> None:
    # The worker's count of its busy slots must agree with the hub's credit, or it refuses calls
    # its hub was entitled to send: here the hub sends the next call as soon as it reads an answer.
    (tmp_path / "ws").mkdir()
    for i in range(8):
        (tmp_path / "ws" / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    server = await start(servers, tmp_path, local_workers=1, local_worker_slots=1)
    await connected(server, ["local-1"], "the local worker")
    calls = [read_call(tmp_path / "ws", f"f{i % 8}.txt", session=f"s{i}") for i in range(120)]
    results = await asyncio.gather(*(server.pool.dispatch(call) for call in calls))
    refused = [r.output for r in results if r.is_error]
    assert not refused, refused[:3]
    assert all(r.worker_id == "local-1" for r in results)


class _ProbingHub(worker_pb2_grpc.WorkerHubServiceServicer):
    """A hub of a release before 2026-12-03: after the Welcome it checks what the worker sees of a
    workspace with a Probe (ConnectResponse field 5, reserved since)."""

    async def Connect(self, request_iterator, context):
        hello = await anext(request_iterator)
        yield worker_pb2.ConnectResponse(welcome=worker_pb2.Welcome(worker_id=hello.hello.worker_id))
        probe = worker_pb2.ConnectResponse()
        probe.MergeFromString(b"\x2a\x0b\x0a\x02p1\x12\x05/repo")  # Probe{probe_id: "p1", workspace: "/repo"}
        yield probe
        async for _ in request_iterator:
            pass


async def test_a_worker_sent_a_message_it_does_not_know_says_the_releases_differ(tmp_path: Path) -> None:
    # A worker of this release on a server before 2026-12-03 dropped its probes without a word:
    # the server found the worker saw no workspace, and every call failed "no connected worker
    # can run read ... (no answer to the probe ...)" while the worker's log said it was connected.
    def warning(worker: subprocess.Popen[str]) -> str:
        assert worker.stderr is not None
        while line := worker.stderr.readline():
            if "WARNING" in line:
                return line
        return ""

    async with _fake_hub(_ProbingHub()) as address:
        worker = worker_process(address, "w1", "--cache-dir", str(tmp_path / "cache"))
        try:
            line = await asyncio.wait_for(asyncio.to_thread(warning, worker), BOUND)
        finally:
            worker.kill()
            worker.wait()
    assert "does not know" in line and "another codelane release" in line, line


class _BadWelcomeHub(worker_pb2_grpc.WorkerHubServiceServicer):
    """A hub whose Welcome names exclusions no worker can apply."""

    async def Connect(self, request_iterator, context):
        hello = await anext(request_iterator)
        yield worker_pb2.ConnectResponse(welcome=worker_pb2.Welcome(
            worker_id=hello.hello.worker_id, content=worker_pb2.ContentSource(exclude=["/etc/*"])))
        async for _ in request_iterator:
            pass


async def test_a_welcome_with_exclusions_a_worker_cannot_apply_ends_it_with_one_line(tmp_path: Path) -> None:
    # The ValueError of the bad pattern escaped the worker's loop: a traceback, exit 1.
    async with _fake_hub(_BadWelcomeHub()) as address:
        code, stderr = await exit_of(worker_process(address, "w1", "--cache-dir", str(tmp_path / "cache")))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "'/etc/*'" in lines[0] and "Traceback" not in stderr, stderr


async def test_an_open_hub_off_loopback_is_refused_before_anything_listens(tmp_path: Path, capsys) -> None:
    # 192.0.2.1 is a documentation address no host has: were the check missing, binding would
    # fail instead (exit 1), and nothing ever listens off loopback.
    code = await asyncio.to_thread(
        server_main, ["--listen", "192.0.2.1:50051", "--data-dir", str(tmp_path / "d"), "--local-workers", "0"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--worker-token" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UnsafeConfig):
        CodelaneServer(ServerConfig(listen="[::]:0", token="t")).hub_token()
    for safe in (ServerConfig(listen="[::]:0", worker_token="w"), ServerConfig(listen="0.0.0.0:0", tls_ca="ca.pem"),
                 ServerConfig(listen="localhost:0")):
        CodelaneServer(safe).hub_token()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_local_workers_connect_when_the_server_speaks_tls(servers, tmp_path: Path, mutual: bool) -> None:
    certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("over tls\n")
    server = await start(servers, tmp_path, local_workers=1, tls_cert=str(certs.server_cert),
                         tls_key=str(certs.server_key), tls_ca=str(certs.ca) if mutual else None)
    await connected(server, ["local-1"], "the local worker")
    result = await server.pool.dispatch(read_call(tmp_path / "ws", "a.txt"))
    assert not result.is_error and result.worker_id == "local-1" and "over tls" in result.output


@pytest.mark.parametrize("case", ["untrusted-server", "no-client-certificate"])
async def test_a_worker_whose_handshake_is_refused_exits_3_with_one_line(servers, tmp_path: Path, case: str) -> None:
    certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
    server = await start(servers, tmp_path, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                         tls_ca=str(certs.ca))
    trusted = certs.stranger_ca if case == "untrusted-server" else certs.ca
    worker = worker_process(f"127.0.0.1:{server.port}", "w1", "--tls-ca", str(trusted))
    code, stderr = await exit_of(worker)
    assert code == 3, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "TLS handshake" in lines[0]
    if case == "untrusted-server":  # said as the CLI says it, not in gRPC's words alone
        assert lines[0].startswith(f"codelane worker: the certificate of 127.0.0.1:{server.port} is not signed by "
                                   "the CA of --tls-ca"), lines
    # With the right certificates the same worker joins.
    good = worker_process(f"127.0.0.1:{server.port}", "w2", "--tls-ca", str(certs.ca),
                          "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key))
    try:
        await connected(server, ["w2"], "the worker with a certificate")
    finally:
        with contextlib.suppress(ProcessLookupError):
            good.kill()
        good.wait()


async def test_a_worker_speaking_tls_to_a_plaintext_hub_is_told_to_drop_tls_ca(servers, tmp_path: Path) -> None:
    # It said "... WRONG_VERSION_NUMBER: Invalid certificate verification context: OK".
    certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
    server = await start(servers, tmp_path)
    worker = worker_process(f"127.0.0.1:{server.port}", "w1", "--tls-ca", str(certs.ca))
    code, stderr = await exit_of(worker)
    assert code == 3, stderr
    assert stderr == (f"codelane worker: the TLS handshake with 127.0.0.1:{server.port} failed (UNAVAILABLE): does "
                      "the server use TLS? Drop --tls-ca if it does not\n"), stderr


@contextlib.asynccontextmanager
async def _fake_hub(hub: worker_pb2_grpc.WorkerHubServiceServicer) -> AsyncIterator[str]:
    """A hub of the test's own on loopback, serving `hub`; its address."""
    grpc_server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(0)


@contextlib.asynccontextmanager
async def _deaf_worker_dropped(server: CodelaneServer, workspace: Path) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    """A worker that heartbeats, so it looks alive, but reads nothing after its Welcome, sent 12 MB
    of Assigns (far more than its stream's window) until the hub dropped it; its stream."""
    # Without BDP probing its window stays gRPC's initial 64 KiB: probing grows it with the round
    # trips it measures, and on a loaded machine it could grow past the 12 MB, so that every
    # Assign was taken, no write waited, and the worker, heartbeating, was never dropped.
    options = [*CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        deaf = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await deaf.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id="deaf", slots=1000, tools=[wire.spec_to_proto(READ.spec)])))
        welcome = (await deaf.read()).welcome  # and nothing more is read here

        async def heartbeats() -> None:  # the worker's own pacing, as a real worker's
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while True:
                    await deaf.write(worker_pb2.ConnectRequest(heartbeat=worker_pb2.Heartbeat()))
                    await asyncio.sleep(welcome.heartbeat_interval.ToTimedelta().total_seconds())

        beating = asyncio.create_task(heartbeats())
        try:
            await connected(server, ["deaf"], "the deaf worker")
            calls = [asyncio.create_task(server.pool.dispatch(QueryCall(
                session_id="s1", call_id=f"c{i}", tool_name="read", timeout=1.0, workspace=str(workspace),
                arguments_json=json.dumps({"file_path": f"{i}" + "x" * 1_000_000}))))
                for i in range(12)]
            results = await asyncio.wait_for(asyncio.gather(*calls), BOUND)
            assert all(r.is_error for r in results)
            await connected(server, [], "the deaf worker is dropped")
            yield deaf
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)


async def test_a_worker_that_stops_reading_is_lost_and_no_call_waits_on_it_for_ever(
    servers, tmp_path: Path
) -> None:
    # Once its stream's window is full a write to it waits for ever. That write held the dispatch
    # of a call, and so its turn, past every deadline. Now a write that waits for the heartbeat
    # timeout loses the worker.
    server = await start(servers, tmp_path)  # heartbeat timeout 3 s
    async with _deaf_worker_dropped(server, tmp_path) as deaf:
        # Its stream's status follows what it did not read (worker.proto, Liveness): once it
        # reads again, the Assigns come first and then why it was dropped.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(BOUND):
                while (await deaf.read()) is not grpc.aio.EOF:
                    pass
        details = error_details(ended.value)
        assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "HEARTBEAT_TIMEOUT"), details


async def test_a_server_stops_cleanly_after_a_dropped_worker_that_never_read_again_went_away(
    servers, tmp_path: Path, caplog
) -> None:
    # The status of its stream waits behind the Assigns it never read, until the stream ends and
    # gRPC refuses it: expected there, not an error with a traceback (it was one).
    server = await start(servers, tmp_path)
    async with _deaf_worker_dropped(server, tmp_path):
        pass  # and its connection closes
    await asyncio.wait_for(server.stop(grace=0.5), BOUND)
    assert not _connect_errors_logged(caplog), caplog.text


async def test_a_call_cancelled_while_its_assign_is_written_is_withdrawn_at_once(servers, tmp_path: Path) -> None:
    # The cancel landed in the dispatch's own write of the Assign, before the code that withdraws
    # a cancelled call: the worker ran the call, its slot taken, until the call's deadline. (The
    # stream's writer task now writes every Assign; a cancel at this point must still withdraw.)
    server = await start(servers, tmp_path, heartbeat_timeout=60.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        worker = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await worker.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id="w", slots=4, tools=[wire.spec_to_proto(READ.spec)])))
        await worker.read()  # Welcome
        await connected(server, ["w"], "the worker")
        call = dataclasses.replace(read_call(tmp_path, "a.txt"), timeout=10 * BOUND)
        dispatching = asyncio.create_task(server.pool.dispatch(call))
        await asyncio.sleep(0)  # one loop turn: the call is assigned, its Assign being written
        dispatching.cancel()
        await asyncio.gather(dispatching, return_exceptions=True)
        assigned = (await asyncio.wait_for(worker.read(), BOUND)).assignments.assigns[0]
        cancel = (await asyncio.wait_for(worker.read(), BOUND)).cancel  # long before the deadline
        assert cancel.dispatch_id == assigned.dispatch_id


async def test_a_call_cancelled_in_the_middle_of_its_assigns_write_leaves_the_worker_connected(
    servers, tmp_path: Path
) -> None:
    # grpc takes one write at a time and does not stop one whose caller is cancelled (the core
    # still sends it): the hub's next write, the Cancel, failed with TOO_MANY_OPERATIONS, and the
    # worker was dropped with every call it ran. 12 MB of Assigns to a worker that reads nothing
    # yet is far more than the transport's window: the stream's writer is held in a write when
    # the first call is cancelled, and its Cancel must wait for that write, not fail beside it.
    server = await start(servers, tmp_path, heartbeat_timeout=60.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
        worker = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await worker.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id="w", slots=12, tools=[wire.spec_to_proto(READ.spec)])))
        await worker.read()  # Welcome
        await connected(server, ["w"], "the worker")
        calls = [asyncio.create_task(server.pool.dispatch(dataclasses.replace(
            read_call(tmp_path, f"{i}" + "x" * 1_000_000), call_id=f"c{i}", timeout=10 * BOUND)))
            for i in range(12)]
        await poll_until(lambda: server.pool.in_flight("w") == 12, what="the calls assigned", within=BOUND)
        writing = calls[0]
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        assigned: list[str] = []
        while len(assigned) < 12:
            assigned += [a.call_id for a in (await asyncio.wait_for(worker.read(), BOUND)).assignments.assigns]
        assert (await asyncio.wait_for(worker.read(), BOUND)).cancel.call_id == "c0"
        assert [w.worker_id for w in server.pool.workers()] == ["w"]
        for call in calls[1:]:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize(
    ("asked", "used"),
    [
        (None, DEFAULT_HEARTBEAT_INTERVAL),
        (duration_pb2.Duration(seconds=0), DEFAULT_HEARTBEAT_INTERVAL),
        (duration_pb2.Duration(nanos=500_000_000), 0.5),
        # A hostile hub's: a negative or nanosecond interval made the worker heartbeat in a loop.
        (duration_pb2.Duration(seconds=-5), MIN_HEARTBEAT_INTERVAL),
        (duration_pb2.Duration(nanos=1), MIN_HEARTBEAT_INTERVAL),
        (duration_pb2.Duration(seconds=2**62), MAX_HEARTBEAT_INTERVAL),
    ],
    ids=["unset", "zero", "half-a-second", "negative", "a-nanosecond", "ages"],
)
def test_a_welcomes_heartbeat_interval_is_kept_within_bounds(asked, used: float) -> None:
    welcome = worker_pb2.Welcome(worker_id="w1")
    if asked is not None:
        welcome.heartbeat_interval.CopyFrom(asked)
    assert heartbeat_interval(welcome) == used
