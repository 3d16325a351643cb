"""The codelane.v1 contract, held to what codelane does with it (not to what protobuf does):

- the generated descriptors are the .proto files, compiled now;
- every RPC of every service answers on a real server;
- the converters fill every field of every message the server sends, and the Python SDK reads
  every field back with its value (ids and sequences past 2**53 included);
- every value of every enum maps both ways between the protos, the server's domain values and
  the SDK's names, with none left unmapped;
- every ErrorKind a tool returns on a real worker process reaches the client intact.

Each check walks the descriptors, so a field, enum value, event kind or RPC added to the
protos fails here until codelane handles it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import io
import json
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pb2
from grpc_tools import protoc

from codelane import client as sdk_client
from codelane import events as sdk
from codelane import render
from codelane.v1 import (
    admin_pb2,
    events_pb2,
    session_pb2,
    session_pb2_grpc,
    tools_pb2,
    worker_pb2,
    worker_pb2_grpc,
    workspace_pb2,
)
from session_server import events as ev
from session_server.api import admin, convert
from session_server.config import LaneMode, build_settings
from session_server.events import CallInfo, ExternalTaskInfo, StoredEvent
from session_server.llm.base import Usage
from session_server.pool import WorkerSnapshot, WorkspaceHeld
from session_server.stats import StatsLane
from session_server.store import SessionRecord, StoredMessage
from session_server.tool_listing import ListedTool, Runner
from tests.session import conftest as session_fixtures
from tests.session.conftest import RPC_TIMEOUT, Client, InProcess, call, kind, read_rest, read_until, scripted
from tool_worker import wire
from tool_worker.confinement.policy import NetworkAccess, SandboxMode, SandboxPolicy, SandboxSettings
from tool_worker.merkle import Digest
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind, Lane

# The session tests' real servers (in-process, on 127.0.0.1:0) and workspace.
make_server = session_fixtures.make_server
workspace = session_fixtures.workspace

REPO = Path(__file__).resolve().parent.parent
MODULES = ["tools", "events", "session", "worker", "admin", "workspace"]
PB2 = {name: importlib.import_module(f"codelane.v1.{name}_pb2") for name in MODULES}
EPOCH = 1_764_000_000.0
# Past 2**53: a sequence that went through a double would come back changed.
BIG_SEQUENCE = 2**60 + 1


# -- the descriptors are the .proto files --------------------------------------------------------


def test_the_generated_descriptors_are_the_proto_files(tmp_path: Path) -> None:
    compiled = tmp_path / "codelane.pb"
    proto_root = REPO / "protos"
    sources = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "codelane" / "v1").glob("*.proto"))
    well_known = str(Path(protoc.__file__).parent / "_proto")
    status = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--descriptor_set_out={compiled}", *sources])
    assert status == 0, "protoc could not compile protos/"
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(compiled.read_bytes()).file}
    assert set(files) == {f"codelane/v1/{name}.proto" for name in MODULES}
    for name, module in PB2.items():
        loaded = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        fresh = files[f"codelane/v1/{name}.proto"]
        assert _without_json_names(loaded) == _without_json_names(fresh), (
            f"{name}_pb2 is not protos/codelane/v1/{name}.proto: run python scripts/gen_protos.py"
        )


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A copy without json_name, which protoc derives from each field's name (and the generated
    code leaves out)."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    pending = list(copy.message_type)
    while pending:
        message = pending.pop()
        for field in message.field:
            field.ClearField("json_name")
        pending.extend(message.nested_type)
    return copy


def test_tool_arguments_are_json_strings_not_struct() -> None:
    # Struct numbers are doubles: ids and counts past 2**53 would change on the way.
    for module in PB2.values():
        for message in _messages(module.DESCRIPTOR):
            for field in message.fields:
                assert field.message_type is None or field.message_type.full_name != "google.protobuf.Struct", (
                    field.full_name
                )


def _messages(file: descriptor.FileDescriptor) -> list[descriptor.Descriptor]:
    found: list[descriptor.Descriptor] = []
    pending = list(file.message_types_by_name.values())
    while pending:
        message = pending.pop()
        if not message.GetOptions().map_entry:
            found.append(message)
            pending.extend(message.nested_types)
    return found


# -- every RPC answers on a real server ----------------------------------------------------------


def _all_rpcs() -> set[str]:
    return {
        f"{service.name}.{method.name}"
        for module in PB2.values()
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


async def test_every_rpc_of_every_service_answers_on_a_real_server(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(heartbeat_timeout=30.0)
    client = server.client
    answered: set[str] = set()

    def rpc(name: str) -> None:
        answered.add(name)

    # WorkerHubService, as a worker would: Hello, Welcome, then a drain ordered by an operator.
    hub = worker_pb2_grpc.WorkerHubServiceStub(client.channel)
    outbox: asyncio.Queue[worker_pb2.ConnectRequest | None] = asyncio.Queue()
    spec = wire.spec_to_proto(ToolRegistry.builtin().get("read").spec)
    await outbox.put(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(worker_id="contract", version="1", tools=[spec],
                                                                      slots=1)))

    async def requests():
        while (message := await outbox.get()) is not None:
            yield message

    stream = hub.Connect(requests())
    try:
        welcome = (await asyncio.wait_for(stream.read(), RPC_TIMEOUT)).welcome
        rpc("WorkerHubService.Connect")
        assert welcome.worker_id == "contract" and welcome.heartbeat_interval.ToNanoseconds() > 0
        listed = await client.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT)
        rpc("AdminService.ListWorkers")
        assert [w.worker_id for w in listed.workers] == ["contract"]
        drained = await client.admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="contract", reason="test"),
                                                 timeout=RPC_TIMEOUT)
        rpc("AdminService.DrainWorker")
        assert drained.worker.state == admin_pb2.WORKER_STATE_DRAINING
        while not (message := await asyncio.wait_for(stream.read(), RPC_TIMEOUT)).HasField("drain"):
            pass
        assert message.drain.reason == "test"
    finally:
        await outbox.put(None)
        stream.cancel()

    # A session whose write asks for a confirmation.
    write = [{"text": "", "tool_calls": [call("write", "c_w", file_path="out.txt", content="hi\n")]}, {"text": "Done."}]
    asking = await client.create(workspace, scripted(tmp_path, write, "ask.yaml"),
                                 permissions=session_pb2.PermissionPolicy(ask=["write"]))
    rpc("SessionService.CreateSession")
    turn = client.send_stream(asking.session_id, "go")
    await read_until(turn, lambda r: kind(r.event) == "confirmation_required", [])
    rpc("SessionService.SendMessage")
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=asking.session_id, call_id="c_w", approve=True),
        timeout=RPC_TIMEOUT)
    rpc("SessionService.ConfirmToolCall")
    rest = await read_rest(turn)
    assert rest[-1].event.turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert (workspace / "out.txt").read_text() == "hi\n"

    # A session whose Execute calls clients run: claimed, renewed, completed.
    queue = session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE,
                                                                  mode=tools_pb2.LANE_MODE_EXTERNAL)])
    external = await client.create(workspace, scripted(tmp_path, write, "external.yaml"), queue=queue)
    turn = client.send_stream(external.session_id, "go")
    await read_until(turn, lambda r: kind(r.event) == "external_task_pending", [])
    sessions: session_pb2_grpc.SessionServiceStub = client.sessions
    [task] = (await sessions.ClaimExternalTasks(session_pb2.ClaimExternalTasksRequest(
        session_id=external.session_id, client_id="cli"), timeout=RPC_TIMEOUT)).tasks
    rpc("SessionService.ClaimExternalTasks")
    renewed = (await sessions.RenewExternalTaskLease(session_pb2.RenewExternalTaskLeaseRequest(
        session_id=external.session_id, task_id=task.task_id, client_id="cli"), timeout=RPC_TIMEOUT)).task
    rpc("SessionService.RenewExternalTaskLease")
    assert renewed.task_id == task.task_id and renewed.attempt == 1
    await sessions.CompleteExternalTask(session_pb2.CompleteExternalTaskRequest(
        session_id=external.session_id, task_id=task.task_id, client_id="cli",
        result=tools_pb2.ToolResult(output="written elsewhere")), timeout=RPC_TIMEOUT)
    rpc("SessionService.CompleteExternalTask")
    await read_rest(turn)

    got = await client.get(asking.session_id)
    rpc("SessionService.GetSession")
    assert got.session_id == asking.session_id and got.state == session_pb2.SESSION_STATE_IDLE
    listed_sessions = await sessions.ListSessions(session_pb2.ListSessionsRequest(), timeout=RPC_TIMEOUT)
    rpc("SessionService.ListSessions")
    assert {s.session_id for s in listed_sessions.sessions} == {asking.session_id, external.session_id}
    replay, caught_up = await client.watch(asking.session_id)
    rpc("SessionService.WatchEvents")
    assert caught_up == replay[-1].sequence == got.last_sequence
    history = await client.history(asking.session_id)
    rpc("SessionService.GetMessages")
    assert [m.role for m in history] == [session_pb2.MESSAGE_ROLE_USER, session_pb2.MESSAGE_ROLE_ASSISTANT,
                                         session_pb2.MESSAGE_ROLE_TOOL, session_pb2.MESSAGE_ROLE_ASSISTANT]
    assert not await client.cancel(asking.session_id)  # idle: nothing to cancel
    rpc("SessionService.CancelTurn")
    offered = await sessions.ListTools(session_pb2.ListToolsRequest(session_id=asking.session_id),
                                       timeout=RPC_TIMEOUT)
    rpc("SessionService.ListTools")
    [write_tool] = [tool for tool in offered.tools if tool.spec.name == "write"]
    assert write_tool.runner == session_pb2.TOOL_RUNNER_SERVER and write_tool.spec.lane == tools_pb2.LANE_EXECUTE
    stats = await client.admin.GetQueueStats(admin_pb2.GetQueueStatsRequest(), timeout=RPC_TIMEOUT)
    rpc("AdminService.GetQueueStats")
    [execute] = [lane for lane in stats.lanes if lane.lane == tools_pb2.LANE_EXECUTE]
    assert execute.completed == 2
    await sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=external.session_id),
                                 timeout=RPC_TIMEOUT)
    rpc("SessionService.DeleteSession")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await client.get(external.session_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    info = await client.admin.GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=RPC_TIMEOUT)
    rpc("AdminService.GetServerInfo")
    assert info.version and info.start_time.seconds > 0

    assert answered == _all_rpcs()


# -- every field the server sends is filled, and the SDK reads it back -------------------------


def unfilled(message: Any, path: str = "") -> list[str]:
    """The fields of `message` (recursively) left at their default; of a oneof only the member set."""
    missing = []
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not field.has_presence:
            continue
        if oneof is not None and len(oneof.fields) > 1 and message.WhichOneof(oneof.name) != field.name:
            continue
        name = path + field.name
        value = getattr(message, field.name)
        if field.is_repeated:  # maps too
            if not value:
                missing.append(name)
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                # A field some items leave at its default by meaning (a reason only when there
                # is one) is filled if any item fills it.
                missing += sorted(set.intersection(*(set(unfilled(item, f"{name}[].")) for item in value)))
        elif field.has_presence:
            if not message.HasField(field.name):
                missing.append(name)
            elif field.message_type is not None and not field.message_type.full_name.startswith("google.protobuf."):
                missing += unfilled(value, f"{name}.")
        elif value == field.default_value:
            missing.append(name)
    return missing


CALL = CallInfo("call_7", "grep", '{"pattern": "x"}', "query", 3)
TOOL_RESULT = ev.ToolResult.error(ErrorKind.TIMEOUT, "too slow", exit_code=124, truncated=True, metadata={"pid": 7},
                                  worker_id="w-2", attempt=2, queue_wait=0.25, run_time=1.5)
USAGE = Usage(11, 22, 5)
TASK = ExternalTaskInfo("task_1", "s_1", CALL, "execute", 2, EPOCH + 30, EPOCH + 600, "/ws",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=1")

# One of each event kind, every field set to a value of its own.
PAYLOADS: list[ev.EventPayload] = [
    ev.TurnStarted("find the bug"),
    ev.TextDelta("Looking", 2),
    ev.ModelResponded(2, [CALL], USAGE, "tool_use"),
    ev.ToolCallStarted(CALL, "query", "w-2", 2),
    ev.ToolCallFinished("call_7", "grep", TOOL_RESULT, 0.25, 1.5),
    ev.ConfirmationRequired(CALL, EPOCH + 60, "ask: write(*.txt)"),
    ev.ConfirmationResolved("call_7", "approved", "fine by me"),
    ev.ExternalTaskPending(TASK),
    ev.ExternalTaskCompleted("task_1", "call_7", TOOL_RESULT, "cli-1"),
    ev.CallRetried("call_7", 2, "worker w-1 lost", "w-1"),
    ev.WorkerLost("w-1", "stream broke", ["call_7"]),
    ev.TurnFinished("end_turn", USAGE, 3, 4, "Done."),
    ev.ErrorOccurred("MODEL_ERROR", "the model failed", True),
]


def _stored(payload: ev.EventPayload) -> StoredEvent:
    return StoredEvent("s_1", BIG_SEQUENCE, EPOCH, "turn_1", payload)


def test_every_event_kind_is_sent_and_read_by_the_same_name() -> None:
    kinds = [ev.payload_to_json(p)[0] for p in PAYLOADS]
    oneof = {f.name for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert sorted(kinds) == sorted(ev.EVENT_KINDS) == sorted(oneof)
    for payload, name in zip(PAYLOADS, kinds, strict=True):
        message = convert.event(_stored(payload))
        assert message.WhichOneof("kind") == name
        assert sdk.event_from_proto(message).kind == name


def test_an_event_of_a_kind_this_sdk_does_not_know_is_read_and_shown() -> None:
    # A newer server's kind: a field this proto lacks (number 99), so no oneof member is set. The
    # bare Event the SDK gives for it had no kind (KeyError), and `codelane watch` crashed on it.
    known = events_pb2.Event(session_id="s_1", sequence=7, turn_id="turn_1").SerializeToString()
    message = events_pb2.Event.FromString(known + b"\x9a\x06\x02\x08\x01")  # field 99: {1: 1}
    event = sdk.event_from_proto(message)
    assert type(event) is sdk.Event and (event.sequence, event.kind) == (7, "unknown")
    assert json.loads(render.event_json(event))["kind"] == "unknown"
    out = io.StringIO()
    render.PlainRenderer(out).show(event)
    assert "unknown" in out.getvalue()


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_field_of_an_event_is_filled_and_read_back(payload: ev.EventPayload) -> None:
    message = convert.event(_stored(payload))
    assert unfilled(message) == []
    read = sdk.event_from_proto(events_pb2.Event.FromString(message.SerializeToString()))
    assert (read.session_id, read.sequence, read.time, read.turn_id) == ("s_1", BIG_SEQUENCE, EPOCH, "turn_1")
    expected, got = _plain(payload), _plain(read)
    assert {name: got[name] for name in expected} == expected


def _plain(value: Any) -> Any:
    """Dataclasses as dicts, enums as their values, sequences as lists, floats to the microsecond:
    the server's domain objects and the SDK's then compare field by field."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, float):
        return round(value, 6)
    return value


FULL_CONFIG = session_pb2.SessionConfig(
    model="scripted:demo.yaml",
    system_prompt="Be brief.",
    max_turns=7,
    max_output_tokens=4096,
    queue=session_pb2.QueueConfig(
        query_concurrency=3,
        max_attempts=2,
        lanes=[
            session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, mode=tools_pb2.LANE_MODE_HYBRID,
                                   timeout=wire.duration(30)),
            session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE, mode=tools_pb2.LANE_MODE_EXTERNAL,
                                   timeout=wire.duration(45)),
        ],
        external_task_timeout=wire.duration(120),
    ),
    permissions=session_pb2.PermissionPolicy(
        allow=["read"], deny=["bash(rm *)"], ask=["write(*.txt)"], default_action=session_pb2.PERMISSION_ACTION_ASK,
        confirmation_timeout=wire.duration(90), timeout_action=session_pb2.PERMISSION_ACTION_ALLOW,
    ),
    sandbox=session_pb2.SandboxPolicy(
        mode=session_pb2.SANDBOX_MODE_READ_ONLY, network=session_pb2.SANDBOX_NETWORK_ON,
        limits=session_pb2.SandboxLimits(max_processes=64, max_memory_bytes=2**30, max_cpu_time=wire.duration(20),
                                         max_open_files=256),
    ),
    env={"LANG": "C.UTF-8"},
)
# What the operator allows: FULL_CONFIG's sandbox (network on) and every mode.
PERMISSIVE_SANDBOX = SandboxSettings(allow_unsandboxed=True, allow_network=True)


def _session(config: session_pb2.SessionConfig, state: str = "running") -> session_pb2.Session:
    settings = build_settings(convert.settings_request(config), default_model="", sandbox=PERMISSIVE_SANDBOX)
    record = SessionRecord("s_1", "/ws", settings.to_dict(), {"team": "core"}, state, EPOCH, EPOCH + 1, 9, 4)
    return convert.session(record)


def test_a_session_shows_every_field_and_the_whole_config_the_client_set() -> None:
    session = _session(FULL_CONFIG)
    assert unfilled(session) == []
    assert session.config == FULL_CONFIG


def test_a_worker_shows_every_field() -> None:
    snapshot = WorkerSnapshot(
        worker_id="w-1", version="0.1", hostname="gpu-3", peer="ipv4:10.0.0.3:5000", labels={"gpu": "true"},
        tools=["read", "grep"], slots=8, in_flight=2, workspace_roots=["/srv"], draining=True, connected_at=EPOCH,
        last_seen=EPOCH + 5, workspaces={
            "/srv/a": WorkspaceHeld("synced", Digest("ab" * 32, 140)),
            "/srv/b": WorkspaceHeld("unavailable", Digest("cd" * 32, 96), "its cache disk is full"),
            "/srv/c": WorkspaceHeld("shared", None),
        }, completed=41,
        max_in_flight_seen=8,
    )
    whole = convert.worker_info(snapshot, convert.MAX_PAGE_BYTES)
    assert len(whole.workspaces) == 3 and whole.omitted_workspaces == 0
    # One byte short: the last workspace by path is left out, and counted.
    cut = convert.worker_info(snapshot, whole.ByteSize() - 1)
    assert [w.workspace for w in cut.workspaces] == ["/srv/a", "/srv/b"] and unfilled(cut) == []


def test_a_message_shows_every_field_and_the_sdk_reads_it_back() -> None:
    from codelane.client import Message as SdkMessage

    stored = StoredMessage(idx=3, role="tool", text="found it", tool_calls=[CALL], tool_call_id="call_7",
                           tool_result=TOOL_RESULT, turn_id="turn_1", created=EPOCH)
    message = convert.message(stored)
    assert unfilled(message) == []
    read = SdkMessage.from_proto(message)
    assert (read.index, read.role, read.text, read.tool_call_id) == (4, "tool", "found it", "call_7")
    expected, got = _plain(stored), _plain(read)
    assert got["tool_calls"] == expected["tool_calls"] and got["tool_result"] == expected["tool_result"]


# -- every enum value maps both ways -----------------------------------------------------------


def _sdk_name(enum: descriptor.EnumDescriptor, number: int) -> str:
    return enum.values_by_number[number].name.removeprefix(_prefix(enum)).lower()


def _prefix(enum: descriptor.EnumDescriptor) -> str:
    return enum.values_by_number[0].name.removesuffix("UNSPECIFIED")


def _stop_reasons() -> dict[str, int]:
    return {reason: convert.event(_stored(ev.TurnFinished(reason, USAGE, 1, 1, ""))).turn_finished.stop_reason
            for reason in _names(events_pb2.StopReason.DESCRIPTOR)}


def _outcomes() -> dict[str, int]:
    return {outcome: convert.event(_stored(ev.ConfirmationResolved("c", outcome, ""))).confirmation_resolved.outcome
            for outcome in _names(events_pb2.ConfirmationOutcome.DESCRIPTOR)}


def _roles() -> dict[str, int]:
    return {role: convert.message(StoredMessage(role=role)).role for role in _names(session_pb2.MessageRole.DESCRIPTOR)}


def _lanes() -> dict[str, int]:
    # Tool calls carry the tool lanes; queue statistics add LLM requests. The Control lane
    # (cancel, confirm, complete) is never queued, so no message carries it.
    tool_lanes = {lane.value: convert.tool_call(CallInfo("c", "t", "{}", lane.value, 0)).lane for lane in Lane}
    for lane in Lane:
        assert wire.spec_from_proto(wire.spec_to_proto(ToolRegistry.builtin().specs(lane)[0])).lane is lane
    stats_lanes = {str(lane): admin.LANE_PROTOS[str(lane)] for lane in StatsLane}
    return {**tool_lanes, **stats_lanes, "control": tools_pb2.LANE_CONTROL}


def _lane_modes() -> dict[str, int]:
    modes = {}
    for number in tools_pb2.LaneMode.DESCRIPTOR.values_by_number:
        if number:
            config = session_pb2.SessionConfig(queue=session_pb2.QueueConfig(
                lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, mode=number)]))
            settings = build_settings(convert.settings_request(config), default_model="scripted:x")
            shown = convert.session(SessionRecord("s", "/", settings.to_dict())).config.queue.lanes
            [query] = [lane for lane in shown if lane.lane == tools_pb2.LANE_QUERY]
            modes[settings.query_mode.value] = query.mode
    return modes


def _actions() -> dict[str, int]:
    actions = {}
    for number in session_pb2.PermissionAction.DESCRIPTOR.values_by_number:
        if number:
            policy = session_pb2.PermissionPolicy(default_action=number)
            config = session_pb2.SessionConfig(permissions=policy)
            settings = build_settings(convert.settings_request(config), "scripted:x")
            shown = convert.session(SessionRecord("s", "/", settings.to_dict())).config.permissions
            actions[settings.permissions.default_action.value] = shown.default_action
    return actions


def _error_kinds() -> dict[str, int]:
    kinds = {}
    for error_kind in ErrorKind:
        message = wire.result_to_proto(ev.ToolResult.error(error_kind, "x"))
        assert wire.ERROR_KIND_FROM_PROTO[message.error_kind] is error_kind
        read = sdk.ToolResult.from_proto(message)
        assert read.to_proto().error_kind == message.error_kind  # the SDK completes tasks with it
        kinds[read.error_kind] = message.error_kind
        assert read.error_kind == error_kind.value
    return kinds


def _sandbox_config(policy: session_pb2.SandboxPolicy) -> session_pb2.SandboxPolicy:
    settings = build_settings(convert.settings_request(session_pb2.SessionConfig(sandbox=policy)), "scripted:x",
                              sandbox=PERMISSIVE_SANDBOX)
    return convert.session(SessionRecord("s", "/", settings.to_dict())).config.sandbox


def _sandbox_modes() -> dict[str, int]:
    # The domain and the SDK both spell modes as the CLI does ("read-only"); the enum as read_only.
    modes = {}
    for number in session_pb2.SandboxMode.DESCRIPTOR.values_by_number:
        if number:
            shown = _sandbox_config(session_pb2.SandboxPolicy(mode=number)).mode
            [mode] = [mode for mode in SandboxMode if convert.sandbox_policy(SandboxPolicy(mode=mode)).mode == shown]
            assert sdk_client._SANDBOX_MODES[mode.value] == shown
            modes[mode.value.replace("-", "_")] = shown
    return modes


def _sandbox_networks() -> dict[str, int]:
    networks = {}
    for number in session_pb2.SandboxNetwork.DESCRIPTOR.values_by_number:
        if number:
            shown = _sandbox_config(session_pb2.SandboxPolicy(network=number)).network
            [network] = [network for network in NetworkAccess
                         if convert.sandbox_policy(SandboxPolicy(network=network)).network == shown]
            assert sdk_client._SANDBOX_NETWORKS[network.value] == shown
            networks[network.value] = shown
    return networks


def _session_states() -> dict[str, int]:
    return {state: _session(FULL_CONFIG, state).state for state in ("running", "idle")}


def _worker_states() -> dict[str, int]:
    states = {}
    for draining, name in ((False, "ready"), (True, "draining")):
        snapshot = WorkerSnapshot("w", "", "", "", {}, [], 1, 0, [], draining, EPOCH, EPOCH, {}, 0, 0)
        states[name] = convert.worker_info(snapshot, convert.MAX_PAGE_BYTES).state
    return states


def _workspace_modes() -> dict[str, int]:
    modes = {}
    for mode in _names(workspace_pb2.WorkspaceMode.DESCRIPTOR):
        held = {"/ws": WorkspaceHeld(mode, Digest("ab" * 32, 140))}
        snapshot = WorkerSnapshot("w", "", "", "", {}, [], 1, 0, [], False, EPOCH, EPOCH, held, 0, 0)
        modes[mode] = convert.worker_info(snapshot, convert.MAX_PAGE_BYTES).workspaces[0].mode
    return modes


def _tool_runners() -> dict[str, int]:
    listed = ListedTool(ToolRegistry.builtin().get("read").spec, Runner.SERVER, (), False, LaneMode.INTERNAL)
    runners = {runner.value: convert.available_tool(dataclasses.replace(listed, runner=runner)).runner
               for runner in Runner}
    for name, number in runners.items():
        message = session_pb2.AvailableTool(spec=wire.spec_to_proto(listed.spec), runner=number)
        assert sdk_client.ToolInfo.from_proto(message).runner == name  # the SDK reads the same name
    return runners


def _names(enum: descriptor.EnumDescriptor) -> list[str]:
    return [_sdk_name(enum, number) for number in enum.values_by_number if number]


# Per enum: the server's domain value (a lower-case name) -> the number the server sends for it.
DOMAIN_TO_PROTO: dict[str, Callable[[], dict[str, int]]] = {
    "codelane.v1.StopReason": _stop_reasons,
    "codelane.v1.ConfirmationOutcome": _outcomes,
    "codelane.v1.MessageRole": _roles,
    "codelane.v1.Lane": _lanes,
    "codelane.v1.LaneMode": _lane_modes,
    "codelane.v1.PermissionAction": _actions,
    "codelane.v1.ErrorKind": _error_kinds,
    "codelane.v1.SessionState": _session_states,
    "codelane.v1.WorkerState": _worker_states,
    "codelane.v1.SandboxMode": _sandbox_modes,
    "codelane.v1.SandboxNetwork": _sandbox_networks,
    "codelane.v1.WorkspaceMode": _workspace_modes,
    "codelane.v1.ToolRunner": _tool_runners,
}


def test_every_enum_has_its_mapping_checked() -> None:
    enums = {enum.full_name for module in PB2.values() for enum in module.DESCRIPTOR.enum_types_by_name.values()}
    assert enums == set(DOMAIN_TO_PROTO)


@pytest.mark.parametrize("enum_name", sorted(DOMAIN_TO_PROTO))
def test_every_enum_value_maps_both_ways(enum_name: str) -> None:
    enum = next(module.DESCRIPTOR.enum_types_by_name[enum_name.rsplit(".", 1)[1]] for module in PB2.values()
                if enum_name.rsplit(".", 1)[1] in module.DESCRIPTOR.enum_types_by_name)
    sent = DOMAIN_TO_PROTO[enum_name]()
    # Every value but UNSPECIFIED is sent for exactly one domain value ...
    assert sorted(sent.values()) == sorted(number for number in enum.values_by_number if number)
    # ... which is the name the SDK reads it as: one vocabulary on both sides of the wire.
    assert {name: _sdk_name(enum, number) for name, number in sent.items()} == {name: name for name in sent}


# -- every ErrorKind reaches the client intact ---------------------------------------------------


async def test_every_error_kind_a_worker_may_send_reaches_the_client_intact(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server(local_workers=1, local_worker_tools=["tests.error_kinds_plugin"],
                                          local_fallback=False)
    client: Client = server.client
    await client.wait_workers("local-1")
    calls = [call("fail_as", f"c_{error_kind.value}", kind=error_kind.value) for error_kind in ErrorKind]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    session = await client.create(workspace, model)
    events = await client.send(session.session_id, "fail every way")

    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
                if kind(e) == "tool_call_finished"}
    history = {m.tool_call_id: m.tool_result for m in await client.history(session.session_id)
               if m.role == session_pb2.MESSAGE_ROLE_TOOL}
    for error_kind in ErrorKind:
        # Except the hub's own outcomes, which a worker cannot claim (tools.proto, ToolResult).
        received = ErrorKind.TOOL_ERROR if error_kind in wire.HUB_OUTCOMES else error_kind
        for result in (finished[f"c_{error_kind.value}"], history[f"c_{error_kind.value}"]):
            assert result.worker_id == "local-1"  # through the worker's stream, the hub and the store
            assert result.is_error and result.error_kind == wire.ERROR_KIND_TO_PROTO[received], error_kind
            assert result.output == f"failed as {error_kind.value}" and result.exit_code == len(error_kind.value)
            assert sdk.ToolResult.from_proto(result).error_kind == received.value

