"""One trace across a client, a server process and two worker processes, received by a real OTLP
gRPC receiver: every span's parent, name, kind and GenAI attributes. And external tasks carry
the call's trace context to the client that claims them."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.api.observe import ObservingInterceptor
from session_server.metrics import ServerMetrics
from session_server.telemetry import Telemetry
from tests.ops.conftest import OtlpReceiver, SpanRecord, Workers
from tests.session.conftest import Processes, call, collect, scripted
from tool_worker.telemetry.tracing import Tracing

SLEEP_MS = 400  # long enough that both calls are on their workers at once
# Spans leave each process within 50 ms instead of the SDK's default 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def _one(spans: list[SpanRecord], **where: object) -> SpanRecord:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, f"expected one span with {where}, got {found}"
    return found[0]


def _complete(spans: list[SpanRecord]) -> bool:
    # Every span the test reads: each process exports in batches of its own, and a span ends when
    # its work does (SendMessage's after the turn's last event is written), in no set order.
    names = [s.name for s in spans]
    return (names.count("run_tool sleep") == 2 and names.count("execute_tool sleep") == 2
            and sum(name.startswith("chat ") for name in names) == 2
            and {"invoke_agent codelane", "client turn", "codelane.v1.SessionService/CreateSession",
                 "codelane.v1.SessionService/SendMessage"} <= set(names))


async def test_one_trace_follows_a_turn_across_client_server_and_two_workers(
    processes: Processes, workspace: Path, tmp_path: Path, otlp: OtlpReceiver, worker_procs: Workers
) -> None:
    model = scripted(tmp_path, [
        {"text": "Two at once.", "tool_calls": [call("sleep", "c1", ms=SLEEP_MS), call("sleep", "c2", ms=SLEEP_MS)]},
        {"text": "Done."},
    ])
    server = await processes.start_server(
        tmp_path / "data", model=model, local_workers=0,
        env={**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint},
    )
    address = f"127.0.0.1:{server.port}"
    for worker_id in ("w1", "w2"):
        worker_procs.spawn(address, worker_id, "--otlp-endpoint", otlp.endpoint, env=FAST_EXPORT)
    await server.client.wait_workers("w1", "w2")

    # The client's own span; its context goes to the server as W3C metadata.
    client_tracing = Tracing("test-client", endpoint=otlp.endpoint)
    root = client_tracing.start("client turn", kind="client")
    traceparent, _ = client_tracing.carrier(root)
    metadata = (("traceparent", traceparent),)
    created = await server.client.sessions.CreateSession(
        session_pb2.CreateSessionRequest(workspace=str(workspace)), metadata=metadata, timeout=10)
    sid = created.session.session_id
    stream = server.client.sessions.SendMessage(
        session_pb2.SendMessageRequest(session_id=sid, text="sleep twice"), metadata=metadata)
    events = [e for reply in await collect(stream) for e in reply.events]
    root.end()
    await asyncio.to_thread(client_tracing.shutdown)
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    ran_on = {e.tool_call_started.call.call_id: e.tool_call_started.worker_id
              for e in events if e.WhichOneof("kind") == "tool_call_started"}
    assert sorted(ran_on.values()) == ["w1", "w2"], ran_on

    spans = await otlp.wait_for(_complete, "the whole turn")
    trace_id = root.get_span_context().trace_id.to_bytes(16, "big").hex()
    client = _one(spans, name="client turn")
    assert client.service == "test-client" and client.kind == "client" and client.parent_span_id == ""
    mine = [s for s in spans if s.trace_id == trace_id]

    create = _one(mine, name="codelane.v1.SessionService/CreateSession")
    send = _one(mine, name="codelane.v1.SessionService/SendMessage")
    for rpc in (create, send):
        assert rpc.service == "codelane-server" and rpc.kind == "server"
        assert rpc.parent_span_id == client.span_id
        assert rpc.attributes["rpc.system"] == "grpc" and rpc.attributes["rpc.service"] == "codelane.v1.SessionService"
        assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert send.attributes["rpc.method"] == "SendMessage"

    agent = _one(mine, name="invoke_agent codelane")
    assert agent.parent_span_id == send.span_id and agent.kind == "internal"
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.agent.name"] == "codelane"
    assert agent.attributes["gen_ai.conversation.id"] == sid
    assert agent.attributes["gen_ai.provider.name"] == "scripted"
    assert agent.attributes["codelane.stop_reason"] == "end_turn"
    usage = events[-1].turn_finished.usage
    assert agent.attributes["gen_ai.usage.input_tokens"] == usage.input_tokens
    assert agent.attributes["gen_ai.usage.output_tokens"] == usage.output_tokens

    chats = [s for s in mine if s.name.startswith("chat ")]
    assert len(chats) == 2
    for chat in chats:
        assert chat.parent_span_id == agent.span_id and chat.kind == "client"
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "scripted"
        assert chat.name == f"chat {chat.attributes['gen_ai.request.model']}"
        assert chat.attributes["gen_ai.usage.input_tokens"] > 0

    for call_id, worker_id in ran_on.items():
        tool = next(s for s in mine
                    if s.name == "execute_tool sleep" and s.attributes["gen_ai.tool.call.id"] == call_id)
        assert tool.service == "codelane-server" and tool.parent_span_id == agent.span_id
        assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
        assert tool.attributes["gen_ai.tool.name"] == "sleep"
        assert tool.attributes["gen_ai.tool.type"] == "function"
        assert tool.attributes["codelane.worker.id"] == worker_id
        assert tool.attributes["codelane.outcome"] == "ok" and not tool.error
        remote = next(s for s in mine if s.name == "run_tool sleep" and s.attributes["gen_ai.tool.call.id"] == call_id)
        assert remote.service == "codelane-worker" and remote.instance == worker_id
        assert remote.kind == "server" and remote.parent_span_id == tool.span_id
        assert remote.attributes["gen_ai.tool.name"] == "sleep"
        assert remote.attributes["codelane.worker.id"] == worker_id
        assert remote.attributes["gen_ai.conversation.id"] == sid

    # Nothing of the turn fell out of the trace (no span of it started a trace of its own).
    assert {s.trace_id for s in spans if s.name != "codelane.v1.AdminService/ListWorkers"} == {trace_id}


async def test_an_external_task_carries_the_trace_context_of_its_call(
    otlp: OtlpReceiver, make_server, workspace: Path, tmp_path: Path
) -> None:
    server = await make_server(otlp_endpoint=otlp.endpoint)
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "b1", command="echo hi")]}, {"text": "ok"}])
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(
        lane=tools_pb2.LANE_EXECUTE, mode=tools_pb2.LANE_MODE_EXTERNAL)])
    session = await server.client.create(workspace, model, queue=queue)
    stream = server.client.send_stream(session.session_id, "run it outside")
    # A claim waits (long-polls) for the task the turn offers.
    reply = await server.client.sessions.ClaimExternalTasks(session_pb2.ClaimExternalTasksRequest(
        session_id=session.session_id, client_id="outside", max_tasks=1, wait={"seconds": 20}), timeout=30)
    assert len(reply.tasks) == 1
    claimed = reply.tasks[0]
    traceparent = claimed.trace_context.traceparent
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1 and len(trace_id) == 32 and len(span_id) == 16  # sampled
    await server.client.sessions.CompleteExternalTask(session_pb2.CompleteExternalTaskRequest(
        session_id=session.session_id, task_id=claimed.task_id, client_id="outside",
        result={"output": "hi"}), timeout=10)
    await collect(stream)
    await server.server.stop(grace=0.5)  # sends the server's spans
    spans = await otlp.wait_for(lambda s: any(x.name == "execute_tool bash" for x in s), "the bash call's span")
    bash = _one(spans, name="execute_tool bash")
    assert (bash.trace_id, bash.span_id) == (trace_id, span_id)
    assert bash.attributes["codelane.worker.id"] == "outside"


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Context:
    """What the interceptor asks of a call's context: the status a handler set (none here)."""

    def code(self) -> None:
        return None


async def test_a_stream_closed_from_another_task_ends_its_span_without_a_context_error(
    otlp: OtlpReceiver, monkeypatch, caplog
) -> None:
    # grpc.aio abandons a response stream whose call was cancelled while it was writing (outside
    # the generator), and the event loop's finalizer closes it later in a task, and a context, of
    # its own. The call's span must still end, and the interceptor must not restore a context in
    # a task that never entered it (OpenTelemetry then logs "Failed to detach context").
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    tracing = Tracing("codelane-server", endpoint=otlp.endpoint)
    interceptor = ObservingInterceptor(Telemetry(ServerMetrics(), tracing))
    entered: list[bool] = []

    async def numbers(request: object, context: object):
        for n in range(3):
            entered.append(trace.get_current_span().get_span_context().is_valid)
            yield n

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(numbers)

    handler = await interceptor.intercept_service(continuation, _Details("/codelane.v1.SessionService/WatchEvents"))
    stream = handler.unary_stream(None, _Context())
    assert await asyncio.create_task(anext(stream)) == 0  # a task of its own, as grpc's handler is
    assert entered == [True]  # the handler ran inside the call's span
    assert not trace.get_current_span().get_span_context().is_valid  # and left nothing current here
    await asyncio.create_task(stream.aclose())  # another task, as the loop's finalizer

    name = "codelane.v1.SessionService/WatchEvents"
    spans = await otlp.wait_for(lambda s: any(x.name == name for x in s), "the abandoned stream's span")
    await asyncio.to_thread(tracing.shutdown)
    assert _one(spans, name=name).kind == "server"
    assert not [r for r in caplog.records if "detach" in r.getMessage()], caplog.text


class _Request:
    """A request the test can watch die (protobuf messages take no weak references)."""


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_refused_request_is_freed_at_once_not_by_the_collector(streaming: bool) -> None:
    # The interceptor kept the handler's exception in a local: the exception's traceback holds
    # the frame, the frame the exception, and that cycle kept each refused request (60 MiB ones
    # included) alive until Python's collector ran: gigabytes under a flood of them.
    interceptor = ObservingInterceptor(Telemetry(ServerMetrics(), None))

    async def refuse(request: object, context: object) -> None:
        raise ValueError("refused")

    async def refuse_stream(request: object, context: object):
        raise ValueError("refused")
        yield  # an async generator

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if streaming:
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)

    handler = await interceptor.intercept_service(continuation, _Details("/codelane.v1.SessionService/SendMessage"))
    request = _Request()
    alive = weakref.ref(request)
    gc.disable()
    try:
        with pytest.raises(ValueError):
            if streaming:
                await anext(handler.unary_stream(request, _Context()))
            else:
                await handler.unary_unary(request, _Context())
        del request
        assert alive() is None
    finally:
        gc.enable()
