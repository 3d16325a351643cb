"""Protocol fuzzing: one real `codelane server` process on loopback is sent generated requests on
every method a client or a worker can call, and must answer each with a deliberate status.

Requests are built from the proto descriptors with adversarial field values (empty, huge,
boundary and negative numbers, NaN and infinities, unicode edge cases, unknown enum values,
nested and repeated fields, other sessions' ids, absurd limits and page sizes), and some are then
mutated as bytes (a string field of invalid UTF-8, an unknown field, a flipped or truncated
byte). The worker hub's stream is sent a Hello (valid or not) and then generated messages.

Oracles, for every example: the call ends with a code the server means (never UNKNOWN, which is
what an exception escaping a servicer becomes, nor INTERNAL or DATA_LOSS); its message holds no
traceback nor the repr of an internal object; the process lives and its health check says
SERVING; its stderr holds no traceback nor asyncio's "never retrieved" and "Exception in
callback"; a session whose id the generator never sees keeps its history; and an honest worker
process stays connected.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codelane.reapi import bytestream_pb2, remote_execution_pb2
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, tools_pb2, worker_pb2
from tests.polling import wait_until
from tests.session.conftest import listening_port
from tool_worker import wire
from tool_worker.tools.read import TOOL as READ

WORKER_TOKEN = "fuzz-worker-secret"
RPC_TIMEOUT = 5.0
STREAM_TIMEOUT = 1.5  # a following WatchEvents or a waiting claim is cut here: DEADLINE_EXCEEDED

# A fair run outside CI: CODELANE_FUZZ_EXAMPLES=2500 (a few minutes).
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("CODELANE_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# Codes a server means. UNKNOWN is an exception escaping a servicer; INTERNAL and DATA_LOSS are
# never a right answer to a request. UNAVAILABLE from a live server would be a store failure.
FORBIDDEN_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
                   grpc.StatusCode.UNAVAILABLE}
LEAKS = re.compile(r"Traceback|File \"|<[\w.]+ object at 0x|\w+Error\(|Exception in callback|never retrieved")
STDERR_FAILURES = ("Traceback", "Task exception was never retrieved", "Exception in callback")


@dataclass
class FuzzServer:
    proc: subprocess.Popen[bytes]
    port: int
    err: Path
    workspace: Path
    channel: grpc.Channel
    sessions: list[str]  # ids the generator may use
    witness: str  # a session the generator never names
    witness_messages: bytes
    honest: subprocess.Popen[bytes]

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    base = tmp_path_factory.mktemp("fuzz")
    workspace = base / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "a.py").write_text("print('a')\n")
    (base / "script.yaml").write_text(json.dumps({"responses": [{"text": "ok"}] * 50}))
    out, err = base / "server.out", base / "server.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CODELANE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "codelane.cli", "server", "--listen", "127.0.0.1:0",
            "--data-dir", str(base / "data"), "--local-workers", "0", "--scripts-dir", str(base),
            "--model", f"scripted:{base / 'script.yaml'}", "--worker-token", WORKER_TOKEN,
            "--log-level", "WARNING"]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    honest = channel = None
    try:
        def listening() -> int | None:
            assert proc.poll() is None, err.read_text(errors="replace")
            return listening_port(out.read_text(errors="replace"))

        port = wait_until(listening, within=20.0, what="the server to listen")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = session_pb2_grpc.SessionServiceStub(channel)
        ids = []
        for _ in range(3):
            created = stub.CreateSession(session_pb2.CreateSessionRequest(workspace=str(workspace)),
                                         timeout=RPC_TIMEOUT)
            ids.append(created.session.session_id)
        for session_id in ids:
            for _ in stub.SendMessage(session_pb2.SendMessageRequest(session_id=session_id, text="hi"),
                                      timeout=RPC_TIMEOUT):
                pass
        witness = ids.pop()
        messages = stub.GetMessages(session_pb2.GetMessagesRequest(session_id=witness), timeout=RPC_TIMEOUT)
        worker_env = {**env, "CODELANE_WORKER_TOKEN": WORKER_TOKEN}
        honest = subprocess.Popen([sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{port}", "--id",
                                   "honest", "--cache-dir", str(base / "cache")], env=worker_env,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        server = FuzzServer(proc, port, err, workspace, channel, ids, witness, messages.SerializeToString(),
                            honest)
        wait_until(lambda: _honest_ready(server), within=20.0, what="the honest worker")
        yield server
    finally:
        if channel is not None:
            channel.close()
        if honest is not None:
            _kill_group(honest.pid)
            honest.wait(10)
        _kill_group(proc.pid)
        proc.wait(10)


def _honest_ready(server: FuzzServer) -> bool:
    listed = admin_pb2_grpc.AdminServiceStub(server.channel).ListWorkers(admin_pb2.ListWorkersRequest(),
                                                                          timeout=RPC_TIMEOUT)
    return any(w.worker_id == "honest" for w in listed.workers)


# -- generating messages from descriptors ---------------------------------------------------------

FD = pb_descriptor.FieldDescriptor
INT32 = [-(2**31), -1, 0, 1, 2, 7, 100, 1000, 1001, 2**31 - 1]
INT64 = [-(2**63), -1, 0, 1, 2**31, 10**12, 2**53 + 1, 2**63 - 1]
UINT = [0, 1, 2**32 - 1]
UINT64 = [0, 1, 2**64 - 1]
FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1.5]
BYTES = [b"", b"\xff\xfe\xfd", b"\x00", b"\xc3", b"\xed\xa0\x80", bytes(range(256))]


def _strings(server: FuzzServer) -> st.SearchStrategy[str]:
    fixed = [
        "", " ", "\n", "\x00", "\x7f", "\u202e", "\ufeff", "🙂", "é", "日本", "\U0010ffff", "%s%n", "{}", "${HOME}",
        "..", "../..", "/", "/etc/passwd", "*", "**", "bash(*)", "read(/**)",
        "0", "-1", "18446744073709551616", "9" * 19, "1e9", "nan", "true", "null", "[]",
        "openai:mock", "scripted:/etc/passwd", "scripted:script.yaml", "scripted:../x", "mock", "local", "local-1",
        str(server.workspace), str(server.workspace / "src"), str(server.workspace.parent),
        "default", "blobs/" + "0" * 64 + "/0", "/blobs/" + "e3b0c442" * 8 + "/0",
        "uploads/u/blobs/" + "0" * 64 + "/1", "default/blobs/zz/1",
        *server.sessions, server.sessions[0] + "\x00", server.sessions[0].upper(),
    ]
    # Long strings are built, not listed: a failure's report shows the strategy.
    long = st.sampled_from([256, 257, 1025, 16_385, 70_000, 1_100_000]).map(lambda n: "x" * n)
    return st.one_of(st.sampled_from(fixed), st.text(max_size=12), long)


def _scalar(field: pb_descriptor.FieldDescriptor, strings: st.SearchStrategy[str]) -> st.SearchStrategy:
    t = field.type
    if t == FD.TYPE_STRING:
        return strings
    if t == FD.TYPE_BYTES:
        return st.one_of(st.sampled_from(BYTES), st.binary(max_size=16))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=32 if t == FD.TYPE_FLOAT else 64))
    if t == FD.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from([*known, -1, max(known) + 1, 2**31 - 1])
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(st.sampled_from(INT32), st.integers(-(2**31), 2**31 - 1))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.sampled_from(UINT)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.sampled_from(UINT64)
    raise AssertionError(f"no strategy for {field.full_name}")


def _duration_like(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Duration and Timestamp: the boundaries of their ranges and beyond."""
    seconds = st.sampled_from([0, 1, -1, 30, 3600, 3601, 86_400, 86_401, 315_576_000_000, 315_576_000_001,
                               253_402_300_799, -(2**63), 2**63 - 1])
    nanos = st.sampled_from([0, 1, 1_000_000, 999_999_999, 1_000_000_000, -1, -(2**31), 2**31 - 1])
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def messages(cls: type[Message], strings: st.SearchStrategy[str], depth: int = 0) -> st.SearchStrategy[Message]:
    descriptor = cls.DESCRIPTOR
    if descriptor.full_name in ("google.protobuf.Duration", "google.protobuf.Timestamp"):
        return _duration_like(cls)
    optional = {}
    for field in descriptor.fields:
        if field.type == FD.TYPE_MESSAGE:
            if depth >= 3:
                continue
            sub = field.message_type._concrete_class
            if field.message_type.GetOptions().map_entry:
                key = _scalar(field.message_type.fields_by_name["key"], strings)
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == FD.TYPE_MESSAGE:
                    continue
                optional[field.name] = st.dictionaries(key, _scalar(value_field, strings), max_size=4)
                continue
            value = st.deferred(lambda sub=sub: messages(sub, strings, depth + 1))
        else:
            value = _scalar(field, strings)
        if field.is_repeated:
            value = st.lists(value, max_size=4)
        optional[field.name] = value

    def build(values: dict) -> Message:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if isinstance(value, dict):
                getattr(message, name).update(value)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FD.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def wire_bytes(draw, cls: type[Message], strings: st.SearchStrategy[str]) -> bytes:
    """A generated message, encoded, and sometimes mutated on the wire."""
    data = draw(messages(cls, strings)).SerializeToString()
    mutation = draw(st.sampled_from(["none", "none", "bad_utf8", "unknown_field", "flip", "truncate", "garbage"]))
    string_fields = [f.number for f in cls.DESCRIPTOR.fields if f.type == FD.TYPE_STRING]
    if mutation == "bad_utf8" and string_fields:
        number = draw(st.sampled_from(string_fields))
        payload = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"a\x80b"]))
        data += _varint(number << 3 | 2) + _varint(len(payload)) + payload
    elif mutation == "unknown_field":
        data += _varint(9999 << 3 | 2) + _varint(3) + b"abc"
    elif mutation == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "garbage":
        data = draw(st.binary(max_size=32))
    return data


# -- the oracles ----------------------------------------------------------------------------------


def _check_status(where: str, code: grpc.StatusCode, details: str | None) -> None:
    assert code not in FORBIDDEN_CODES, f"{where}: {code} {details!r}"
    assert not LEAKS.search(details or ""), f"{where}: the status leaks internals: {details!r}"


def _check_server(server: FuzzServer, where: str) -> None:
    assert server.proc.poll() is None, f"{where}: the server died:\n{server.stderr()[-4000:]}"
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, where
    log = server.stderr()
    for failure in STDERR_FAILURES:
        assert failure not in log, f"{where}: the server's stderr has {failure!r}:\n{log[-4000:]}"
    messages = session_pb2_grpc.SessionServiceStub(server.channel).GetMessages(
        session_pb2.GetMessagesRequest(session_id=server.witness), timeout=RPC_TIMEOUT)
    assert messages.SerializeToString() == server.witness_messages, f"{where}: another session changed"


# -- clients' methods -----------------------------------------------------------------------------

SERVICES = [
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    remote_execution_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"],
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"],
]
METHODS = [method for service in SERVICES for method in service.methods]
CONTENT = {"build.bazel.remote.execution.v2.ContentAddressableStorage", "google.bytestream.ByteStream"}


def _seeds(server: FuzzServer) -> dict[str, list[Message]]:
    """Valid requests, per method, that the mutations start from."""
    s = server.sessions[0]
    digest = remote_execution_pb2.Digest(hash="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    result = tools_pb2.ToolResult(output="out", metadata_json="{}")
    seeds = [
        session_pb2.CreateSessionRequest(workspace=str(server.workspace), labels={"k": "v"},
                                         config=session_pb2.SessionConfig(
            model=f"scripted:{server.workspace.parent / 'script.yaml'}", max_turns=2,
            queue=session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY,
                                                                        mode=tools_pb2.LANE_MODE_EXTERNAL)]),
            permissions=session_pb2.PermissionPolicy(allow=["read(src/**)"], deny=["bash"]))),
        session_pb2.GetSessionRequest(session_id=s),
        session_pb2.ListSessionsRequest(page_size=1, page_token=""),
        session_pb2.SendMessageRequest(session_id=s, text="hi"),
        session_pb2.WatchEventsRequest(session_id=s, after_sequence=1),
        session_pb2.CancelTurnRequest(session_id=s, reason="r"),
        session_pb2.ConfirmToolCallRequest(session_id=s, call_id="c", approve=True, reason="r"),
        session_pb2.ClaimExternalTasksRequest(session_id=s, client_id="c", max_tasks=1),
        session_pb2.CompleteExternalTaskRequest(session_id=s, task_id="t", client_id="c", result=result),
        session_pb2.RenewExternalTaskLeaseRequest(session_id=s, task_id="t", client_id="c"),
        session_pb2.GetMessagesRequest(session_id=s, page_size=1, page_token="1"),
        session_pb2.ListToolsRequest(session_id=s),
        admin_pb2.ListWorkersRequest(page_size=1),
        admin_pb2.DrainWorkerRequest(worker_id="nobody", reason="r"),
        remote_execution_pb2.FindMissingBlobsRequest(blob_digests=[digest]),
        remote_execution_pb2.BatchReadBlobsRequest(digests=[digest]),
        remote_execution_pb2.BatchUpdateBlobsRequest(requests=[
            remote_execution_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=b"")]),
        remote_execution_pb2.GetTreeRequest(root_digest=digest),
        bytestream_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/0"),
        bytestream_pb2.WriteRequest(resource_name=f"uploads/u1/blobs/{digest.hash}/0", finish_write=True),
    ]
    by_type: dict[str, list[Message]] = {}
    for seed in seeds:
        by_type.setdefault(seed.DESCRIPTOR.full_name, []).append(seed)
    return by_type


@st.composite
def mutated(draw, seed: Message, strings: st.SearchStrategy[str]) -> bytes:
    """`seed` with one field, at most two levels down, given a generated value."""
    message = type(seed)()
    message.CopyFrom(seed)
    target = message
    for _ in range(2):
        fields = [f for f in target.DESCRIPTOR.fields]
        if not fields:
            break
        field = draw(st.sampled_from(fields))
        is_map = field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
        if field.type == FD.TYPE_MESSAGE and not field.is_repeated and draw(st.booleans()):
            target = getattr(target, field.name)  # go down
            continue
        if is_map:
            if field.message_type.fields_by_name["value"].type != FD.TYPE_MESSAGE:
                key = _scalar(field.message_type.fields_by_name["key"], strings)
                value = _scalar(field.message_type.fields_by_name["value"], strings)
                getattr(target, field.name).update(draw(st.dictionaries(key, value, max_size=3)))
        elif field.type == FD.TYPE_MESSAGE:
            value = draw(messages(field.message_type._concrete_class, strings, depth=1))
            if field.is_repeated:
                getattr(target, field.name).append(value)
            else:
                getattr(target, field.name).CopyFrom(value)
        elif field.is_repeated:
            getattr(target, field.name).extend(draw(st.lists(_scalar(field, strings), max_size=3)))
        else:
            setattr(target, field.name, draw(_scalar(field, strings)))
        break
    return message.SerializeToString()


def _call(server: FuzzServer, method: pb_descriptor.MethodDescriptor, requests: list[bytes],
          metadata: tuple[tuple[str, str], ...]) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = server.channel
    try:
        if method.client_streaming and not method.server_streaming:
            channel.stream_unary(path)(iter(requests), timeout=RPC_TIMEOUT, metadata=metadata)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(requests[0], timeout=STREAM_TIMEOUT, metadata=metadata):
                pass
        else:
            channel.unary_unary(path)(requests[0], timeout=RPC_TIMEOUT, metadata=metadata)
    except grpc.RpcError as exc:
        _check_status(path, exc.code(), exc.details())


def test_no_generated_client_request_gets_an_unmeant_status(fuzz_server: FuzzServer) -> None:
    strings = _strings(fuzz_server)
    all_seeds = _seeds(fuzz_server)
    good = (("authorization", f"Bearer {WORKER_TOKEN}"),)
    token = st.sampled_from([good] * 4 + [(), (("authorization", "Bearer x"),)])

    @FUZZ_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(METHODS))
        cls = method.input_type._concrete_class
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        seeds = all_seeds.get(cls.DESCRIPTOR.full_name, [])

        def request() -> bytes:
            if seeds and data.draw(st.booleans()):
                return data.draw(mutated(data.draw(st.sampled_from(seeds)), strings))
            return data.draw(wire_bytes(cls, strings))

        requests = [request() for _ in range(count)]
        if method.name == "DeleteSession" and any(s.encode() in r for r in requests for s in fuzz_server.sessions):
            return  # deleting the sessions the seeds name is a request the server rightly serves
        metadata = data.draw(token) if method.containing_service.full_name in CONTENT else ()
        _call(fuzz_server, method, requests, metadata)
        _check_server(fuzz_server, method.full_name)

    check()


# -- a worker's stream ----------------------------------------------------------------------------

CONNECT = "/codelane.v1.WorkerHubService/Connect"


def _valid_hello(number: int) -> bytes:
    return worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
        worker_id=f"fuzz-{number}", slots=1, tools=[wire.spec_to_proto(READ.spec)],
    )).SerializeToString()


def test_no_generated_worker_stream_gets_an_unmeant_status(fuzz_server: FuzzServer) -> None:
    strings = _strings(fuzz_server)
    counter = iter(range(10**9))

    @FUZZ_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        first = _valid_hello(next(counter)) if data.draw(st.booleans()) else \
            data.draw(wire_bytes(worker_pb2.ConnectRequest, strings))
        later = data.draw(st.lists(wire_bytes(worker_pb2.ConnectRequest, strings), max_size=4))
        call = fuzz_server.channel.stream_stream(CONNECT)(
            iter([first, *later]), timeout=STREAM_TIMEOUT * 2,
            metadata=(("authorization", f"Bearer {WORKER_TOKEN}"),))
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                _check_status(CONNECT, exc.code(), exc.details())
        _check_server(fuzz_server, CONNECT)
        assert fuzz_server.honest.poll() is None, "the honest worker exited"
        assert _honest_ready(fuzz_server), "the honest worker was dropped"

    check()


def _history_readable(server: FuzzServer, session: str) -> None:
    """What a turn stored reads back: its messages and its events, replayed."""
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    messages = stub.GetMessages(session_pb2.GetMessagesRequest(session_id=session), timeout=RPC_TIMEOUT)
    assert [m.role for m in messages.messages][-1:] == [session_pb2.MESSAGE_ROLE_ASSISTANT], messages
    replay = list(stub.WatchEvents(session_pb2.WatchEventsRequest(session_id=session), timeout=RPC_TIMEOUT))
    assert replay[-1].HasField("caught_up")


# -- a worker's answers to the calls it is assigned -----------------------------------------------

FUZZ_TOOL = tools_pb2.ToolSpec(name="fuzz_tool", description="a tool only the fuzzing worker offers",
                               parameters_json_schema='{"type": "object"}', lane=tools_pb2.LANE_QUERY)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@st.composite
def call_results(draw, strings: st.SearchStrategy[str]) -> Callable[[str], bytes]:
    """A ConnectRequest of CallResults, given the dispatch_id they answer: generated results, maybe
    others for ids the hub never gave, and maybe a string of bad UTF-8 inside a ToolResult. Drawn
    before the call exists: an example hypothesis abandons mid-way must not leave a turn waiting."""
    drawn = []
    for _ in range(draw(st.integers(1, 3))):
        result = draw(messages(worker_pb2.CallResult, strings))
        answers = draw(st.integers(0, 3)) > 0
        bad = b""
        if draw(st.integers(0, 4)) == 0:
            payload = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"]))
            bad = _field(3, _field(draw(st.sampled_from([1, 8, 10])), payload))  # output, worker_id, metadata_json
        drawn.append((result, answers, bad))

    def encode(dispatch_id: str) -> bytes:
        results = []
        for result, answers, bad in drawn:
            if answers:
                result.dispatch_id = dispatch_id
            results.append(_field(1, result.SerializeToString() + bad))
        return _field(2, b"".join(results))

    return encode


def test_no_generated_call_result_gets_an_unmeant_status_or_stalls_the_turn(fuzz_server: FuzzServer) -> None:
    strings = _strings(fuzz_server)
    counter = iter(range(10**9))
    script = fuzz_server.workspace.parent / "fuzz_call.yaml"
    script.write_text(json.dumps({"responses": [
        {"tool_calls": [{"name": "fuzz_tool", "arguments": {"x": 1}}]}, {"text": "done"}]}))
    sessions = session_pb2_grpc.SessionServiceStub(fuzz_server.channel)

    @settings(FUZZ_SETTINGS, max_examples=max(FUZZ_SETTINGS.max_examples // 3, 10))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        answer = data.draw(call_results(strings))
        outbox: queue.Queue[bytes | None] = queue.Queue()
        outbox.put(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id=f"assigned-{next(counter)}", slots=1, tools=[FUZZ_TOOL])).SerializeToString())
        stream = fuzz_server.channel.stream_stream(CONNECT)(
            iter(outbox.get, None), timeout=RPC_TIMEOUT * 2, metadata=(("authorization", f"Bearer {WORKER_TOKEN}"),))
        responses = iter(stream)
        welcome = worker_pb2.ConnectResponse.FromString(next(responses))
        assert welcome.HasField("welcome")
        session = sessions.CreateSession(session_pb2.CreateSessionRequest(
            workspace=str(fuzz_server.workspace), config=session_pb2.SessionConfig(model=f"scripted:{script}")),
            timeout=RPC_TIMEOUT).session.session_id
        events: list = []
        turn = threading.Thread(target=lambda: events.extend(sessions.SendMessage(
            session_pb2.SendMessageRequest(session_id=session, text="go"), timeout=RPC_TIMEOUT * 3)))
        turn.start()
        status = None
        try:
            for raw in responses:
                message = worker_pb2.ConnectResponse.FromString(raw)
                if message.HasField("assignments"):
                    for assign in message.assignments.assigns:
                        outbox.put(answer(assign.dispatch_id))
                    outbox.put(None)  # the worker leaves: what it did not answer is a lost worker's
        except grpc.RpcError as exc:
            status = exc
            if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                _check_status(CONNECT, exc.code(), exc.details())
        finally:
            outbox.put(None)
        turn.join(RPC_TIMEOUT * 4)
        assert not turn.is_alive(), "the turn did not end"
        finished = [e for r in events for e in r.events if e.HasField("turn_finished")]
        assert finished, (status, [str(r)[:300] for r in events][-3:])
        _history_readable(fuzz_server, session)
        _check_server(fuzz_server, CONNECT)

    check()


# -- a client's results of external tasks ---------------------------------------------------------


def test_no_generated_external_result_gets_an_unmeant_status_or_loses_the_turn(fuzz_server: FuzzServer) -> None:
    strings = _strings(fuzz_server)
    script = fuzz_server.workspace.parent / "external_call.yaml"
    script.write_text(json.dumps({"responses": [
        {"tool_calls": [{"name": "read", "arguments": {"file_path": "src/a.py"}}]}, {"text": "done"}]}))
    sessions = session_pb2_grpc.SessionServiceStub(fuzz_server.channel)
    external = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY,
                                                                      mode=tools_pb2.LANE_MODE_EXTERNAL)])

    @settings(FUZZ_SETTINGS, max_examples=max(FUZZ_SETTINGS.max_examples // 3, 10))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        # Everything is drawn first: an example hypothesis abandons mid-way must leave no turn waiting.
        result = data.draw(messages(tools_pb2.ToolResult, strings)).SerializeToString()
        if data.draw(st.integers(0, 3)) == 0:
            result += _field(data.draw(st.sampled_from([1, 8, 10])), b"\xff")
        session = sessions.CreateSession(session_pb2.CreateSessionRequest(
            workspace=str(fuzz_server.workspace), config=session_pb2.SessionConfig(
                model=f"scripted:{script}", queue=external)), timeout=RPC_TIMEOUT).session.session_id
        events: list = []
        turn = threading.Thread(target=lambda: events.extend(sessions.SendMessage(
            session_pb2.SendMessageRequest(session_id=session, text="go"), timeout=RPC_TIMEOUT * 3)))
        turn.start()
        claimed = sessions.ClaimExternalTasks(session_pb2.ClaimExternalTasksRequest(
            session_id=session, client_id="c", wait=duration_pb2.Duration(seconds=5)), timeout=RPC_TIMEOUT)
        assert len(claimed.tasks) == 1, claimed
        task = claimed.tasks[0]
        request = session_pb2.CompleteExternalTaskRequest(session_id=session, task_id=task.task_id, client_id="c")
        raw = request.SerializeToString() + _field(4, result)
        try:
            fuzz_server.channel.unary_unary("/codelane.v1.SessionService/CompleteExternalTask")(
                raw, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            _check_status("CompleteExternalTask", exc.code(), exc.details())
            # Refused: it changed nothing, and the task still takes a good result.
            sessions.CompleteExternalTask(session_pb2.CompleteExternalTaskRequest(
                session_id=session, task_id=task.task_id, client_id="c",
                result=tools_pb2.ToolResult(output="fine")), timeout=RPC_TIMEOUT)
        turn.join(RPC_TIMEOUT * 4)
        assert not turn.is_alive(), "the turn did not end"
        assert [e for r in events for e in r.events if e.HasField("turn_finished")], events[-1:]
        _history_readable(fuzz_server, session)
        _check_server(fuzz_server, "CompleteExternalTask")

    check()
