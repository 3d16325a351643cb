"""Domain objects <-> codelane.v1 protos for the session and admin APIs.

Each proto message is converted in exactly one place: the tool library's types (ToolSpec,
ToolResult, durations and timestamps) in `tool_worker.wire`, which worker processes share
without loading the server; the worker stream's own messages in `session_server.api.hub` (the
hub is their only reader and writer); everything the session and admin services send here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from codelane.v1 import admin_pb2, events_pb2, session_pb2, tools_pb2
from session_server import events as ev
from session_server.config import LaneMode, PermissionsRequest, SandboxRequest, SessionSettings, SettingsRequest
from session_server.events import CallInfo, ExternalTaskInfo, StoredEvent
from session_server.limits import well_formed_value
from session_server.llm.base import Usage
from session_server.permissions import Action, PermissionPolicy
from session_server.pool import WorkerSnapshot, WorkspaceHeld
from session_server.store import SessionRecord, StoredMessage
from session_server.tool_listing import ListedTool, Runner
from tool_worker import snapshot_wire, wire
from tool_worker.confinement.policy import NetworkAccess, SandboxMode, SandboxPolicy

# A stream message carries a batch of events up to about this size (a single bigger event goes
# alone): under the 4 MiB gRPC clients accept by default, and small enough to start arriving at once.
MAX_BATCH_BYTES = 3 * 1024 * 1024
# A page of a List RPC (GetMessages, ListWorkers) stops before its response reaches this size:
# under the 4 MiB that gRPC clients accept by default (grpc-js, grpc-go, grpc-java and grpc-python
# alike), so a client that did not raise its limit still reads every page.
MAX_PAGE_BYTES = 3 * 1024 * 1024


class _RecentEvents:
    """Events converted lately, with their size: every live subscriber of a session sends the
    same events, and converting one costs more than copying it. Bounded by count and by bytes:
    4,096 events of tool results near their limit held 480 MiB."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events, self.max_bytes = max_events, max_bytes
        self.held_bytes = 0
        self._events: OrderedDict[tuple[str, int], tuple[events_pb2.Event, int]] = OrderedDict()

    def converted(self, stored: StoredEvent) -> tuple[events_pb2.Event, int]:
        key = (stored.session_id, stored.sequence)
        found = self._events.get(key)
        if found is None:
            proto = event(stored)
            found = (proto, proto.ByteSize())
            self._events[key] = found
            self.held_bytes += found[1]
            while len(self._events) > self.max_events or self.held_bytes > self.max_bytes:
                self.held_bytes -= self._events.popitem(last=False)[1][1]
        return found

    def __len__(self) -> int:
        return len(self._events)


recent_events = _RecentEvents(max_events=4096, max_bytes=32 * 1024 * 1024)

M = TypeVar("M")
P = TypeVar("P", bound=protobuf_message.Message)


def batched(
    events: list[StoredEvent], make: Callable[[], M], field: Callable[[M], Any]
) -> Iterator[M]:
    """The events as stream messages: each a `make()` whose repeated Event `field(message)` holds
    consecutive events, split where a message would pass MAX_BATCH_BYTES."""
    message, size = make(), 0
    for stored in events:
        proto, weight = recent_events.converted(stored)
        if size and size + weight > MAX_BATCH_BYTES:
            yield message
            message, size = make(), 0
        field(message).append(proto)
        size += weight
    if size:
        yield message


def field_bytes(size: int) -> int:
    """What a length-delimited field (a string, or a message) of `size` bytes adds to its
    message: tag (fields 1 to 15), length and content."""
    return 1 + (max(size, 1).bit_length() + 6) // 7 + size


def page_within(entries: Iterable[P], ending: Callable[[P], int] = lambda _: 0) -> tuple[list[P], bool]:
    """The leading `entries` (messages of a response's repeated field) whose response stays within
    MAX_PAGE_BYTES, and whether entries were left for the next page. `ending(entry)`: what the
    response adds to its entries if the page ends with `entry` (its next_page_token). The first
    entry is always taken, whatever its size."""
    page: list[P] = []
    size = 0
    for entry in entries:
        size += field_bytes(entry.ByteSize())
        if page and size + ending(entry) > MAX_PAGE_BYTES:
            return page, True
        page.append(entry)
    return page, False



def timestamp(epoch_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    wire.set_timestamp(ts, epoch_seconds)
    return ts


def worker_info(snapshot: WorkerSnapshot, max_bytes: int) -> admin_pb2.WorkerInfo:
    """The worker in at most `max_bytes`: the workspaces that would pass it, the last by path
    first, are left out and counted in omitted_workspaces. Everything else a worker reports comes
    from its Hello (at most 1 MiB, see hub.MAX_HELLO_BYTES), so fits in any budget of a page."""
    info = admin_pb2.WorkerInfo(
        worker_id=snapshot.worker_id,
        version=snapshot.version,
        labels=snapshot.labels,
        tools=snapshot.tools,
        slots=snapshot.slots,
        in_flight=snapshot.in_flight,
        workspace_roots=snapshot.workspace_roots,
        state=admin_pb2.WORKER_STATE_DRAINING if snapshot.draining else admin_pb2.WORKER_STATE_READY,
        connect_time=timestamp(snapshot.connected_at),
        last_heartbeat_time=timestamp(snapshot.last_seen),
        completed_calls=snapshot.completed,
        hostname=snapshot.hostname,
        peer=snapshot.peer,
        # Counted as if all were left out while the room is measured: the final count is no larger.
        omitted_workspaces=len(snapshot.workspaces),
    )
    room = max_bytes - info.ByteSize()
    for workspace, held in snapshot.workspaces.items():
        entry = _workspace_held(workspace, held)
        room -= field_bytes(entry.ByteSize())
        if room < 0:
            break
        info.workspaces.append(entry)
    info.omitted_workspaces -= len(info.workspaces)
    return info


def _workspace_held(workspace: str, held: WorkspaceHeld) -> admin_pb2.WorkspaceVisibility:
    message = admin_pb2.WorkspaceVisibility(
        workspace=workspace, visible=held.visible, reason=held.reason, mode=snapshot_wire.MODE_TO_PROTO[held.mode]
    )
    if held.digest is not None:
        snapshot_wire.set_digest(message.root_digest, held.digest)
    return message


# -- sessions ----------------------------------------------------------------------------------

_LANES = {"query": tools_pb2.LANE_QUERY, "execute": tools_pb2.LANE_EXECUTE}
_STOP_REASONS = {
    "end_turn": events_pb2.STOP_REASON_END_TURN,
    "max_turns": events_pb2.STOP_REASON_MAX_TURNS,
    "cancelled": events_pb2.STOP_REASON_CANCELLED,
    "error": events_pb2.STOP_REASON_ERROR,
    "interrupted": events_pb2.STOP_REASON_INTERRUPTED,
}
_ROLES = {
    "user": session_pb2.MESSAGE_ROLE_USER,
    "assistant": session_pb2.MESSAGE_ROLE_ASSISTANT,
    "tool": session_pb2.MESSAGE_ROLE_TOOL,
}
_OUTCOMES = {
    "approved": events_pb2.CONFIRMATION_OUTCOME_APPROVED,
    "rejected": events_pb2.CONFIRMATION_OUTCOME_REJECTED,
    "timed_out_rejected": events_pb2.CONFIRMATION_OUTCOME_TIMED_OUT_REJECTED,
    "timed_out_approved": events_pb2.CONFIRMATION_OUTCOME_TIMED_OUT_APPROVED,
    "cancelled": events_pb2.CONFIRMATION_OUTCOME_CANCELLED,
}


# The lanes a session's config.queue.lanes may configure.
_CONFIGURABLE_LANES = (tools_pb2.LANE_QUERY, tools_pb2.LANE_EXECUTE)
_LANE_MODES = {
    tools_pb2.LANE_MODE_INTERNAL: LaneMode.INTERNAL,
    tools_pb2.LANE_MODE_EXTERNAL: LaneMode.EXTERNAL,
    tools_pb2.LANE_MODE_HYBRID: LaneMode.HYBRID,
}
_LANE_MODES_TO_PROTO = {mode: value for value, mode in _LANE_MODES.items()}
_ACTIONS = {
    session_pb2.PERMISSION_ACTION_ALLOW: Action.ALLOW,
    session_pb2.PERMISSION_ACTION_DENY: Action.DENY,
    session_pb2.PERMISSION_ACTION_ASK: Action.ASK,
}
_ACTIONS_TO_PROTO = {action: value for value, action in _ACTIONS.items()}
_SANDBOX_MODES = {
    session_pb2.SANDBOX_MODE_WORKSPACE_WRITE: SandboxMode.WORKSPACE_WRITE,
    session_pb2.SANDBOX_MODE_READ_ONLY: SandboxMode.READ_ONLY,
    session_pb2.SANDBOX_MODE_OFF: SandboxMode.OFF,
}
_SANDBOX_MODES_TO_PROTO = {mode: value for value, mode in _SANDBOX_MODES.items()}
_NETWORKS = {session_pb2.SANDBOX_NETWORK_OFF: NetworkAccess.OFF, session_pb2.SANDBOX_NETWORK_ON: NetworkAccess.ON}
_NETWORKS_TO_PROTO = {network: value for value, network in _NETWORKS.items()}


def settings_request(config: session_pb2.SessionConfig) -> SettingsRequest:
    """The client's config as a domain request; values without a domain meaning are listed by field name."""
    request = SettingsRequest(
        model=config.model,
        system_prompt=config.system_prompt,
        max_turns=config.max_turns,
        max_output_tokens=config.max_output_tokens,
        query_concurrency=config.queue.query_concurrency,
        max_attempts=config.queue.max_attempts,
    )
    configured: set[int] = set()
    lanes: Sequence[session_pb2.LaneConfig] = config.queue.lanes
    if len(lanes) > len(_CONFIGURABLE_LANES):
        # Refused before any entry is read: each costs microseconds and a noted problem, and one
        # request holds millions.
        request.unsupported.append(("config.queue.lanes", f"has {len(lanes):,} entries; at most one for each of "
                                    "LANE_QUERY and LANE_EXECUTE"))
        lanes = ()
    for i, lane in enumerate(lanes):
        where = f"config.queue.lanes[{i}]"
        if lane.lane in configured and lane.lane in _CONFIGURABLE_LANES:
            # One would silently win over the other.
            request.unsupported.append((f"{where}.lane", f"{tools_pb2.Lane.Name(lane.lane)} is configured twice"))
        configured.add(lane.lane)
        mode = _LANE_MODES.get(lane.mode)
        if mode is None and lane.mode != tools_pb2.LANE_MODE_UNSPECIFIED:
            request.unsupported.append((f"{where}.mode", f"{lane.mode} is not a LaneMode (INTERNAL, EXTERNAL, HYBRID)"))
        timeout = wire.seconds(lane.timeout) if lane.HasField("timeout") else None
        if lane.lane == tools_pb2.LANE_QUERY:
            request.query_timeout, request.query_mode = timeout, mode
            request.query_timeout_field = f"{where}.timeout"
        elif lane.lane == tools_pb2.LANE_EXECUTE:
            request.execute_timeout, request.execute_mode = timeout, mode
            request.execute_timeout_field = f"{where}.timeout"
        else:
            request.unsupported.append((f"{where}.lane", "must be LANE_QUERY or LANE_EXECUTE"))
    if config.queue.HasField("external_task_timeout"):
        request.external_task_timeout = wire.seconds(config.queue.external_task_timeout)
    if config.HasField("permissions"):
        request.permissions = _permissions_request(config.permissions)
    if config.HasField("sandbox"):
        request.sandbox = _sandbox_request(config.sandbox)
    request.env = dict(config.env)
    return request


def _sandbox_request(policy: session_pb2.SandboxPolicy) -> SandboxRequest:
    def named(table: dict[int, str], value: int) -> str:
        # An unknown number passes through as text, for build_settings to refuse by field name.
        return table[value].value if value in table else str(value) if value else ""

    limits = policy.limits
    return SandboxRequest(
        mode=named(_SANDBOX_MODES, policy.mode),
        network=named(_NETWORKS, policy.network),
        max_processes=limits.max_processes,
        max_memory_bytes=limits.max_memory_bytes,
        max_cpu_seconds=wire.seconds(limits.max_cpu_time) if limits.HasField("max_cpu_time") else None,
        max_open_files=limits.max_open_files,
    )


def sandbox_policy(policy: SandboxPolicy) -> session_pb2.SandboxPolicy:
    limits = policy.limits
    return session_pb2.SandboxPolicy(
        mode=_SANDBOX_MODES_TO_PROTO[policy.mode],
        network=_NETWORKS_TO_PROTO[policy.network],
        limits=session_pb2.SandboxLimits(
            max_processes=limits.processes,
            max_memory_bytes=limits.memory_bytes,
            max_cpu_time=wire.duration(limits.cpu_seconds),
            max_open_files=limits.open_files,
        ),
    )


def _permissions_request(policy: session_pb2.PermissionPolicy) -> PermissionsRequest:
    def action(value: int) -> str:
        # An unknown number passes through as text, for build_settings to refuse by field name.
        return _ACTIONS[value].value if value in _ACTIONS else str(value) if value else ""

    return PermissionsRequest(
        allow=list(policy.allow),
        deny=list(policy.deny),
        ask=list(policy.ask),
        default_action=action(policy.default_action),
        confirmation_timeout=(
            wire.seconds(policy.confirmation_timeout) if policy.HasField("confirmation_timeout") else None
        ),
        timeout_action=action(policy.timeout_action),
    )


def permission_policy(policy: PermissionPolicy) -> session_pb2.PermissionPolicy:
    return session_pb2.PermissionPolicy(
        allow=[r.text for r in policy.allow],
        deny=[r.text for r in policy.deny],
        ask=[r.text for r in policy.ask],
        default_action=_ACTIONS_TO_PROTO[policy.default_action],
        confirmation_timeout=wire.duration(policy.confirmation_timeout),
        timeout_action=_ACTIONS_TO_PROTO[policy.timeout_action],
    )


def external_task(info: ExternalTaskInfo) -> events_pb2.ExternalTask:
    msg = events_pb2.ExternalTask(
        task_id=info.task_id, session_id=info.session_id, call=tool_call(info.call),
        lane=_LANES.get(info.lane, tools_pb2.LANE_UNSPECIFIED), attempt=info.attempt,
        deadline=timestamp(info.deadline), workspace=info.workspace,
    )
    if info.lease_expire_time is not None:
        msg.lease_expire_time.CopyFrom(timestamp(info.lease_expire_time))
    if info.traceparent:
        msg.trace_context.traceparent = info.traceparent
        msg.trace_context.tracestate = info.tracestate
    return msg


def session(record: SessionRecord, settings: SessionSettings | None = None) -> session_pb2.Session:
    """The session as stored (`settings`: its config read with the server's defaults,
    `SessionManager.settings_of`): running from its turn's start until the commit that stores the
    turn's TurnFinished (so not idle while that commit fails and is retried)."""
    settings = settings or SessionSettings.from_dict(record.config)
    config = session_pb2.SessionConfig(
        model=settings.model,
        system_prompt=settings.system_prompt,
        max_turns=settings.max_turns,
        max_output_tokens=settings.max_output_tokens,
        queue=session_pb2.QueueConfig(
            query_concurrency=settings.query_concurrency,
            max_attempts=settings.max_attempts,
            lanes=[
                session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, mode=_LANE_MODES_TO_PROTO[settings.query_mode],
                                       timeout=wire.duration(settings.query_timeout)),
                session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE,
                                       mode=_LANE_MODES_TO_PROTO[settings.execute_mode],
                                       timeout=wire.duration(settings.execute_timeout)),
            ],
            external_task_timeout=wire.duration(settings.external_task_timeout),
        ),
        permissions=permission_policy(settings.permissions),
        sandbox=sandbox_policy(settings.sandbox),
        env=dict(settings.sandbox.env),
    )
    return session_pb2.Session(
        session_id=record.session_id,
        workspace=record.workspace,
        config=config,
        state=session_pb2.SESSION_STATE_RUNNING if record.state == "running" else session_pb2.SESSION_STATE_IDLE,
        create_time=timestamp(record.created),
        update_time=timestamp(record.updated),
        last_sequence=record.last_sequence,
        message_count=record.message_count,
        labels=record.labels,
    )


def tool_call(info: CallInfo, msg: tools_pb2.ToolCall | None = None) -> tools_pb2.ToolCall:
    """Fills `msg` (a field of an enclosing message, which saves a copy) or a new message."""
    if msg is None:
        msg = tools_pb2.ToolCall()
    msg.call_id, msg.tool_name, msg.arguments_json = info.call_id, info.tool_name, info.arguments_json
    msg.lane, msg.index = _LANES.get(info.lane, tools_pb2.LANE_UNSPECIFIED), info.index
    return msg


def usage(value: Usage) -> events_pb2.Usage:
    return events_pb2.Usage(
        input_tokens=value.input_tokens, output_tokens=value.output_tokens,
        cached_input_tokens=value.cached_input_tokens,
    )


def message(stored: StoredMessage) -> session_pb2.Message:
    try:
        return _message(stored)
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot carry: see `well_formed`
        return _message(well_formed_value(stored))


def _message(stored: StoredMessage) -> session_pb2.Message:
    msg = session_pb2.Message(
        index=stored.idx + 1,
        role=_ROLES[stored.role],
        text=stored.text,
        tool_calls=[tool_call(c) for c in stored.tool_calls],
        tool_call_id=stored.tool_call_id,
        turn_id=stored.turn_id,
        create_time=timestamp(stored.created),
    )
    if stored.tool_result is not None:
        wire.result_to_proto(stored.tool_result, msg.tool_result)
    return msg


def event(stored: StoredEvent) -> events_pb2.Event:
    try:
        return _event(stored)
    except UnicodeEncodeError:
        # A lone surrogate (a model's "\ud800" quoted in an error, a file name read with
        # surrogateescape) that no check before caught: the event goes out with U+FFFD in its
        # place rather than break every stream that replays it.
        return _event(well_formed_value(stored))


def _event(stored: StoredEvent) -> events_pb2.Event:
    msg = events_pb2.Event(session_id=stored.session_id, sequence=stored.sequence, turn_id=stored.turn_id)
    wire.set_timestamp(msg.time, stored.time)
    p = stored.payload
    # The two events of every call are filled in place: building a submessage and copying it in
    # would cost each call two copies.
    if isinstance(p, ev.ToolCallStarted):
        started = msg.tool_call_started
        tool_call(p.call, started.call)
        started.lane = _LANES.get(p.lane, tools_pb2.LANE_UNSPECIFIED)
        started.worker_id, started.attempt = p.worker_id, p.attempt
    elif isinstance(p, ev.ToolCallFinished):
        finished = msg.tool_call_finished
        finished.call_id, finished.tool_name = p.call_id, p.tool_name
        wire.result_to_proto(p.result, finished.result)
        wire.set_duration(finished.queue_wait, p.queue_wait)
        wire.set_duration(finished.run_time, p.run_time)
    elif isinstance(p, ev.TurnStarted):
        msg.turn_started.user_text = p.user_text
    elif isinstance(p, ev.TextDelta):
        msg.text_delta.CopyFrom(events_pb2.TextDelta(text=p.text, step=p.step))
    elif isinstance(p, ev.ModelResponded):
        msg.model_responded.CopyFrom(events_pb2.ModelResponded(
            step=p.step, tool_calls=[tool_call(c) for c in p.tool_calls], usage=usage(p.usage),
            stop_reason=p.stop_reason,
        ))
    elif isinstance(p, ev.ConfirmationRequired):
        msg.confirmation_required.CopyFrom(events_pb2.ConfirmationRequired(
            call=tool_call(p.call), deadline=timestamp(p.deadline), rule=p.rule
        ))
    elif isinstance(p, ev.ConfirmationResolved):
        msg.confirmation_resolved.CopyFrom(events_pb2.ConfirmationResolved(
            call_id=p.call_id, outcome=_OUTCOMES.get(p.outcome, 0), reason=p.reason
        ))
    elif isinstance(p, ev.ExternalTaskPending):
        msg.external_task_pending.task.CopyFrom(external_task(p.task))
    elif isinstance(p, ev.ExternalTaskCompleted):
        msg.external_task_completed.CopyFrom(events_pb2.ExternalTaskCompleted(
            task_id=p.task_id, call_id=p.call_id, result=wire.result_to_proto(p.result), client_id=p.client_id
        ))
    elif isinstance(p, ev.CallRetried):
        msg.call_retried.CopyFrom(events_pb2.CallRetried(
            call_id=p.call_id, attempt=p.attempt, reason=p.reason, previous_worker_id=p.previous_worker_id
        ))
    elif isinstance(p, ev.WorkerLost):
        msg.worker_lost.CopyFrom(events_pb2.WorkerLost(worker_id=p.worker_id, reason=p.reason, call_ids=p.call_ids))
    elif isinstance(p, ev.TurnFinished):
        msg.turn_finished.CopyFrom(events_pb2.TurnFinished(
            stop_reason=_STOP_REASONS.get(p.stop_reason, events_pb2.STOP_REASON_UNSPECIFIED), usage=usage(p.usage),
            model_requests=p.model_requests, tool_calls=p.tool_calls, final_text=p.final_text,
        ))
    elif isinstance(p, ev.ErrorOccurred):
        msg.error.CopyFrom(events_pb2.ErrorOccurred(reason=p.reason, message=p.message, fatal=p.fatal))
    return msg


_RUNNERS = {
    Runner.SERVER: session_pb2.TOOL_RUNNER_SERVER,
    Runner.WORKERS: session_pb2.TOOL_RUNNER_WORKERS,
    Runner.EXTERNAL_CLIENT: session_pb2.TOOL_RUNNER_EXTERNAL_CLIENT,
}


def available_tool(tool: ListedTool) -> session_pb2.AvailableTool:
    return session_pb2.AvailableTool(
        spec=wire.spec_to_proto(tool.spec),
        runner=_RUNNERS[tool.runner],
        worker_ids=tool.worker_ids,
        server_fallback=tool.server_fallback,
        lane_mode=_LANE_MODES_TO_PROTO[tool.lane_mode],
    )
