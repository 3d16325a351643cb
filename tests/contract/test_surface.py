"""The server's surface as a stranger meets it: ListTools (RPC, SDK, CLI), and grpcurl-style use,
every RPC called with JSON through reflection (v1 and v1alpha), with no generated stubs."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from codelane.client import Client as SdkClient
from codelane.v1 import session_pb2, tools_pb2
from tests.contract.test_worker_contract import RawWorker, echo_spec
from tests.session import conftest as session_fixtures
from tests.session.conftest import RPC_TIMEOUT, InProcess, call, rpc_error, scripted

make_server = session_fixtures.make_server
workspace = session_fixtures.workspace

# -- ListTools ------------------------------------------------------------------------------------


async def test_list_tools_shows_what_the_model_is_offered_and_where_each_runs(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(local_workers=1)
    client = server.client
    raw = RawWorker(client, "raw", echo_spec())
    assert (await raw.read()).HasField("welcome")
    await client.wait_workers("local-1")
    plain = await client.create(workspace, scripted(tmp_path, [{"text": "x"}]))
    narrowed = await client.create(
        workspace, scripted(tmp_path, [{"text": "x"}], "narrowed.yaml"),
        permissions=session_pb2.PermissionPolicy(deny=["bash"]),
        queue=session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE,
                                                                    mode=tools_pb2.LANE_MODE_EXTERNAL)]),
    )

    async def listed(session_id: str) -> dict[str, session_pb2.AvailableTool]:
        reply = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=session_id),
                                                timeout=RPC_TIMEOUT)
        names = [tool.spec.name for tool in reply.tools]
        assert names == sorted(names)
        return {tool.spec.name: tool for tool in reply.tools}

    tools = await listed(plain.session_id)
    read, echo, write = tools["read"], tools["echo"], tools["write"]
    assert read.spec.lane == tools_pb2.LANE_QUERY and "cat -n" in read.spec.description
    assert json.loads(read.spec.parameters_json_schema)["required"] == ["file_path"]
    assert read.runner == session_pb2.TOOL_RUNNER_WORKERS and list(read.worker_ids) == ["local-1"]
    assert read.server_fallback and read.lane_mode == tools_pb2.LANE_MODE_INTERNAL
    # A tool only a worker has: no server fallback.
    assert echo.runner == session_pb2.TOOL_RUNNER_WORKERS and not echo.server_fallback
    assert list(echo.worker_ids) == ["raw"] and echo.spec.description == echo_spec().description
    # The schema as JSON (re-serialized by the server: the same object, keys sorted).
    assert json.loads(echo.spec.parameters_json_schema) == json.loads(echo_spec().parameters_json_schema)
    assert write.runner == session_pb2.TOOL_RUNNER_SERVER and write.spec.lane == tools_pb2.LANE_EXECUTE
    assert not write.worker_ids and not write.server_fallback

    tools = await listed(narrowed.session_id)
    assert "bash" not in tools  # denied outright: not offered to the model either
    assert tools["write"].runner == session_pb2.TOOL_RUNNER_EXTERNAL_CLIENT
    assert tools["write"].lane_mode == tools_pb2.LANE_MODE_EXTERNAL
    assert tools["read"].runner == session_pb2.TOOL_RUNNER_WORKERS

    missing = await rpc_error(client.sessions.ListTools(session_pb2.ListToolsRequest(session_id="nope"),
                                                        timeout=RPC_TIMEOUT))
    assert missing.code == grpc.StatusCode.NOT_FOUND and missing.reason == "SESSION_NOT_FOUND"

    async with SdkClient(client.address) as sdk:
        infos = {tool.name: tool for tool in await sdk.list_tools(plain.session_id)}
    assert infos["read"].runner == "workers" and infos["read"].worker_ids == ("local-1",)
    assert infos["read"].lane == "query" and infos["read"].parameters["required"] == ["file_path"]
    assert infos["write"].runner == "server" and infos["write"].lane_mode == "internal"

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codelane.cli", "tools", narrowed.session_id, "--server", client.address, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    rows = {row["name"]: row for row in map(json.loads, out.decode().splitlines())}
    assert rows["write"]["runner"] == "external_client" and "bash" not in rows
    assert rows.keys() == tools.keys()
    raw.half_close()


@pytest.mark.parametrize("local_fallback", [True, False])
async def test_a_worker_cannot_redefine_a_server_tool_nor_offer_an_execute_one(
    make_server, workspace: Path, tmp_path: Path, local_fallback: bool
) -> None:
    server: InProcess = await make_server(local_fallback=local_fallback)
    client = server.client
    mine = tools_pb2.ToolSpec(name="read", description="mine", lane=tools_pb2.LANE_QUERY, idempotent=True,
                              parameters_json_schema=json.dumps({"type": "object", "properties": {"x": {}}}))
    raw = RawWorker(client, "raw", mine)
    assert (await raw.read()).HasField("welcome")
    await client.wait_workers("raw")
    # The model is offered, and arguments are checked against, the server's read, not the worker's.
    model = scripted(tmp_path, [{"tool_calls": [{"name": "read", "arguments": {"x": "hello"}}]},
                                {"text": "done"}])
    session = await client.create(workspace, model)
    reply = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=session.session_id),
                                            timeout=RPC_TIMEOUT)
    [read] = [tool for tool in reply.tools if tool.spec.name == "read"]
    assert "cat -n" in read.spec.description and list(read.worker_ids) == ["raw"]
    assert json.loads(read.spec.parameters_json_schema)["required"] == ["file_path"]
    events = await client.send(session.session_id, "read it")
    [finished] = [e.tool_call_finished for e in events if e.WhichOneof("kind") == "tool_call_finished"]
    assert finished.result.error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    raw.half_close()

    bash = RawWorker(client, "bash-worker", tools_pb2.ToolSpec(
        name="bash", description="mine", lane=tools_pb2.LANE_QUERY, parameters_json_schema="{}"))
    refused = await rpc_error(bash.read())
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "INVALID_HELLO"
    assert "'bash' is one of the server's Execute tools" in refused.message


# -- grpcurl-style: reflection and JSON only ------------------------------------------------------


class _V1Stub:
    """grpc.reflection.v1's ServerReflection, whose messages are v1alpha's field for field."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )


class JsonClient:
    """A client that knows nothing of codelane but its address: descriptors come from the server's
    reflection service, requests and responses are JSON."""

    def __init__(self, address: str, version: str) -> None:
        self.channel = grpc.insecure_channel(address)
        database = ProtoReflectionDescriptorDatabase(self.channel)
        if version == "v1":
            database._stub = _V1Stub(self.channel)  # the same client, asking the v1 service
        self.services = list(database.get_services())
        self.pool = descriptor_pool.DescriptorPool(database)

    def method(self, full_name: str):
        service_name, method_name = full_name.rsplit(".", 1)
        method = self.pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/{service_name}/{method_name}"
        kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, True): "stream_stream"}[
            (method.client_streaming, method.server_streaming)]
        stub = getattr(self.channel, kind)(path, request_serializer=request.SerializeToString,
                                           response_deserializer=response.FromString)
        return stub, request, method

    def call(self, full_name: str, body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any] | list:
        """The JSON response (a list for a streaming one), or {"error": CODE, "reason": REASON}."""
        stub, request, method = self.method(full_name)
        try:
            if method.client_streaming:
                replies = stub(iter([json_format.ParseDict(b, request()) for b in body]), timeout=RPC_TIMEOUT)
                return [json_format.MessageToDict(next(replies))]  # the first answer is enough
            message = json_format.ParseDict(body, request())
            if method.server_streaming:
                return [json_format.MessageToDict(r) for r in stub(message, timeout=RPC_TIMEOUT)]
            return json_format.MessageToDict(stub(message, timeout=RPC_TIMEOUT))
        except grpc.RpcError as exc:
            status = rpc_status.from_call(exc)
            info = error_details_pb2.ErrorInfo()
            reason = next((info.reason for d in (status.details if status else ()) if d.Unpack(info)), "")
            return {"error": exc.code().name, "reason": reason}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_every_rpc_can_be_called_with_json_through_reflection(
    make_server, workspace: Path, tmp_path: Path, version: str
) -> None:
    server: InProcess = await make_server()
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", "c1", file_path="README.md")]},
                                {"text": "Done."}])
    # Blocking calls, as a script's: off the event loop the in-process server runs on.
    answered, offered = await asyncio.to_thread(_call_everything, server.client.address, str(workspace), model,
                                                version)
    assert answered == offered


def _call_everything(address: str, workspace: str, model: str, version: str) -> tuple[set[str], set[str]]:
    """Calls every codelane RPC; returns those answered and those reflection lists."""
    client = JsonClient(address, version)
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "codelane.v1.SessionService"} <= set(client.services)
    answered: set[str] = set()

    def rpc(name: str, body: Any, error: tuple[str, str] | None = None) -> Any:
        reply = client.call(f"codelane.v1.{name}", body)
        if error is None:
            assert not (isinstance(reply, dict) and "error" in reply), (name, reply)
        else:
            assert reply == {"error": error[0], "reason": error[1]}, (name, reply)
        answered.add(f"codelane.v1.{name}")
        return reply

    session = rpc("SessionService.CreateSession", {"workspace": workspace, "config": {"model": model}})["session"]
    sid = {"sessionId": session["sessionId"]}
    assert rpc("SessionService.GetSession", sid)["session"]["workspace"] == workspace
    assert any(s["sessionId"] == sid["sessionId"] for s in rpc("SessionService.ListSessions", {})["sessions"])
    tools = rpc("SessionService.ListTools", sid)["tools"]
    assert {"spec": tools[0]["spec"]} and any(t["spec"]["name"] == "read" for t in tools)
    turn = rpc("SessionService.SendMessage", {**sid, "text": "read the README"})
    events = [event for reply in turn for event in reply["events"]]
    assert "turnFinished" in events[-1]
    # int64 sequences are JSON strings, as proto3 JSON mapping says.
    assert events[-1]["sequence"] == str(len(events))
    watched = rpc("SessionService.WatchEvents", {**sid, "afterSequence": "0", "follow": False})
    assert watched[-1]["caughtUp"]["lastSequence"] == str(len(events))
    assert rpc("SessionService.GetMessages", sid)["messages"][0]["role"] == "MESSAGE_ROLE_USER"
    assert rpc("SessionService.CancelTurn", sid) == {}  # cancelled: false, the default, is left out
    rpc("SessionService.ConfirmToolCall", {**sid, "callId": "nope", "approve": True},
        ("NOT_FOUND", "CONFIRMATION_NOT_FOUND"))
    assert rpc("SessionService.ClaimExternalTasks", {**sid, "clientId": "json", "wait": "0s"}) == {}
    task = {**sid, "taskId": "nope", "clientId": "json"}
    rpc("SessionService.CompleteExternalTask", {**task, "result": {"output": "x"}}, ("NOT_FOUND", "TASK_NOT_FOUND"))
    rpc("SessionService.RenewExternalTaskLease", task, ("NOT_FOUND", "TASK_NOT_FOUND"))
    assert rpc("AdminService.ListWorkers", {}) == {}
    rpc("AdminService.DrainWorker", {"workerId": "nope"}, ("NOT_FOUND", "WORKER_NOT_FOUND"))
    assert {lane["lane"] for lane in rpc("AdminService.GetQueueStats", {})["lanes"]} >= {"LANE_QUERY"}
    assert rpc("AdminService.GetServerInfo", {})["version"]
    [welcome] = rpc("WorkerHubService.Connect", [{"hello": {
        "workerId": "json-worker", "version": "1", "slots": 1,
        "tools": [{"name": "echo", "parametersJsonSchema": "{}", "lane": "LANE_QUERY"}]}}])
    assert welcome["welcome"]["workerId"] == "json-worker"
    rpc("SessionService.DeleteSession", sid)
    rpc("SessionService.GetSession", sid, ("NOT_FOUND", "SESSION_NOT_FOUND"))
    offered = {f"{service}.{method.name}" for service in client.services if service.startswith("codelane.v1.")
               for method in client.pool.FindServiceByName(service).methods}
    client.channel.close()
    return answered, offered
