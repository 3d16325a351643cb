"""Session events as plain typed objects, so SDK users never touch `_pb2` classes.

Every event has `session_id`, `sequence` (gap-free per session: resume a watch after the last one
you saw), `time` (epoch seconds) and `turn_id`; `kind` names its type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from codelane.v1 import events_pb2, session_pb2, tools_pb2


def _seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def _lane(value: int) -> str:
    return tools_pb2.Lane.Name(value).removeprefix("LANE_").lower() if value else ""


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    tool_name: str
    arguments_json: str
    lane: str
    index: int

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments parsed; {} when the model produced invalid JSON."""
        try:
            value = json.loads(self.arguments_json or "{}")
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    @classmethod
    def from_proto(cls, msg: tools_pb2.ToolCall) -> ToolCall:
        return cls(msg.call_id, msg.tool_name, msg.arguments_json, _lane(msg.lane), msg.index)


@dataclass(frozen=True)
class ToolResult:
    output: str
    is_error: bool = False
    error_kind: str = ""
    exit_code: int | None = None
    truncated: bool = False
    worker_id: str = ""
    attempt: int = 1
    queue_wait: float = 0.0
    run_time: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: tools_pb2.ToolResult) -> ToolResult:
        kind = tools_pb2.ErrorKind.Name(msg.error_kind).removeprefix("ERROR_KIND_").lower() if msg.error_kind else ""
        return cls(
            output=msg.output, is_error=msg.is_error, error_kind=kind,
            exit_code=msg.exit_code if msg.HasField("exit_code") else None, truncated=msg.truncated,
            worker_id=msg.worker_id, attempt=msg.attempt or 1, queue_wait=_seconds(msg.queue_wait),
            run_time=_seconds(msg.run_time), metadata=json.loads(msg.metadata_json) if msg.metadata_json else {},
        )

    def to_proto(self) -> tools_pb2.ToolResult:
        msg = tools_pb2.ToolResult(output=self.output, is_error=self.is_error, truncated=self.truncated)
        if self.error_kind:
            msg.error_kind = tools_pb2.ErrorKind.Value(f"ERROR_KIND_{self.error_kind.upper()}")
        if self.exit_code is not None:
            msg.exit_code = self.exit_code
        if self.metadata:
            msg.metadata_json = json.dumps(self.metadata)
        if math.isfinite(self.run_time) and self.run_time > 0:
            # A handler's own measure of its run (an external task's): the server records it.
            msg.run_time.FromNanoseconds(round(self.run_time * 1e9))
        return msg


@dataclass(frozen=True)
class ExternalTask:
    """A tool call offered to clients (lane mode EXTERNAL): claim it, run `call`, complete it
    with a ToolResult before `lease_expire_time` (renew the lease to take longer), or it is
    offered again with the next attempt."""

    task_id: str
    session_id: str
    call: ToolCall
    lane: str
    attempt: int
    # Epoch seconds; None while the task is unclaimed.
    lease_expire_time: float | None
    # Epoch seconds: the call ends with a TIMEOUT result if nobody completed it by then.
    deadline: float
    workspace: str
    # W3C Trace Context of the server's span of the call ("" when the server does not trace):
    # a client that traces makes the span in which it runs the task a child of it.
    traceparent: str = ""
    tracestate: str = ""

    @classmethod
    def from_proto(cls, msg: events_pb2.ExternalTask) -> ExternalTask:
        return cls(
            task_id=msg.task_id, session_id=msg.session_id, call=ToolCall.from_proto(msg.call), lane=_lane(msg.lane),
            attempt=msg.attempt,
            lease_expire_time=_seconds(msg.lease_expire_time) if msg.HasField("lease_expire_time") else None,
            deadline=_seconds(msg.deadline), workspace=msg.workspace,
            traceparent=msg.trace_context.traceparent, tracestate=msg.trace_context.tracestate,
        )


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0


@dataclass(frozen=True)
class Event:
    session_id: str
    sequence: int
    time: float
    turn_id: str

    @property
    def kind(self) -> str:
        # "unknown" for a bare Event: a kind of a newer server that this SDK cannot read.
        return _KIND_OF.get(type(self), "unknown")


@dataclass(frozen=True)
class TurnStarted(Event):
    user_text: str = ""


@dataclass(frozen=True)
class TextDelta(Event):
    text: str = ""
    step: int = 0


@dataclass(frozen=True)
class ModelResponded(Event):
    step: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = Usage()
    stop_reason: str = ""


@dataclass(frozen=True)
class ToolCallStarted(Event):
    call: ToolCall | None = None
    lane: str = ""
    worker_id: str = ""
    attempt: int = 1


@dataclass(frozen=True)
class ToolCallFinished(Event):
    call_id: str = ""
    tool_name: str = ""
    result: ToolResult | None = None
    queue_wait: float = 0.0
    run_time: float = 0.0


@dataclass(frozen=True)
class ConfirmationRequired(Event):
    call: ToolCall | None = None
    deadline: float = 0.0
    # Why it waits, e.g. "rule ask[0] `bash`" (the policy's default action when no rule matched).
    rule: str = ""


@dataclass(frozen=True)
class ConfirmationResolved(Event):
    call_id: str = ""
    outcome: str = ""
    reason: str = ""


@dataclass(frozen=True)
class ExternalTaskPending(Event):
    task_id: str = ""
    call: ToolCall | None = None
    # The whole task (attempt, deadline, lane, ...).
    task: ExternalTask | None = None


@dataclass(frozen=True)
class ExternalTaskCompleted(Event):
    task_id: str = ""
    call_id: str = ""
    result: ToolResult | None = None
    client_id: str = ""


@dataclass(frozen=True)
class CallRetried(Event):
    call_id: str = ""
    attempt: int = 0
    reason: str = ""
    previous_worker_id: str = ""


@dataclass(frozen=True)
class WorkerLost(Event):
    worker_id: str = ""
    reason: str = ""
    call_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TurnFinished(Event):
    stop_reason: str = ""
    usage: Usage = Usage()
    model_requests: int = 0
    tool_calls: int = 0
    final_text: str = ""


@dataclass(frozen=True)
class ErrorOccurred(Event):
    reason: str = ""
    message: str = ""
    fatal: bool = False


@dataclass(frozen=True)
class CaughtUp:
    """End of a replay in `watch()`: every stored event up to last_sequence was delivered."""

    last_sequence: int
    kind: str = "caught_up"


_KIND_OF: dict[type, str] = {
    TurnStarted: "turn_started", TextDelta: "text_delta", ModelResponded: "model_responded",
    ToolCallStarted: "tool_call_started", ToolCallFinished: "tool_call_finished",
    ConfirmationRequired: "confirmation_required", ConfirmationResolved: "confirmation_resolved",
    ExternalTaskPending: "external_task_pending", ExternalTaskCompleted: "external_task_completed",
    CallRetried: "call_retried", WorkerLost: "worker_lost", TurnFinished: "turn_finished", ErrorOccurred: "error",
}


def _usage(msg: events_pb2.Usage) -> Usage:
    return Usage(msg.input_tokens, msg.output_tokens, msg.cached_input_tokens)


def _call(msg: tools_pb2.ToolCall) -> ToolCall:
    return ToolCall.from_proto(msg)


def event_from_proto(msg: events_pb2.Event) -> Event:
    """The typed event of a codelane.v1.Event. Unknown kinds (a newer server) give a bare Event,
    whose `kind` is "unknown"."""
    base = {"session_id": msg.session_id, "sequence": msg.sequence, "time": _seconds(msg.time),
            "turn_id": msg.turn_id}
    kind = msg.WhichOneof("kind")
    if kind is None:
        return Event(**base)
    p = getattr(msg, kind)
    if kind == "turn_started":
        return TurnStarted(**base, user_text=p.user_text)
    if kind == "text_delta":
        return TextDelta(**base, text=p.text, step=p.step)
    if kind == "model_responded":
        return ModelResponded(**base, step=p.step, tool_calls=tuple(_call(c) for c in p.tool_calls),
                              usage=_usage(p.usage), stop_reason=p.stop_reason)
    if kind == "tool_call_started":
        return ToolCallStarted(**base, call=_call(p.call), lane=_lane(p.lane), worker_id=p.worker_id,
                               attempt=p.attempt)
    if kind == "tool_call_finished":
        return ToolCallFinished(**base, call_id=p.call_id, tool_name=p.tool_name,
                                result=ToolResult.from_proto(p.result), queue_wait=_seconds(p.queue_wait),
                                run_time=_seconds(p.run_time))
    if kind == "confirmation_required":
        return ConfirmationRequired(**base, call=_call(p.call), deadline=_seconds(p.deadline), rule=p.rule)
    if kind == "confirmation_resolved":
        outcome = events_pb2.ConfirmationOutcome.Name(p.outcome).removeprefix("CONFIRMATION_OUTCOME_").lower()
        return ConfirmationResolved(**base, call_id=p.call_id, outcome=outcome, reason=p.reason)
    if kind == "external_task_pending":
        return ExternalTaskPending(**base, task_id=p.task.task_id, call=_call(p.task.call),
                                   task=ExternalTask.from_proto(p.task))
    if kind == "external_task_completed":
        return ExternalTaskCompleted(**base, task_id=p.task_id, call_id=p.call_id,
                                     result=ToolResult.from_proto(p.result), client_id=p.client_id)
    if kind == "call_retried":
        return CallRetried(**base, call_id=p.call_id, attempt=p.attempt, reason=p.reason,
                           previous_worker_id=p.previous_worker_id)
    if kind == "worker_lost":
        return WorkerLost(**base, worker_id=p.worker_id, reason=p.reason, call_ids=tuple(p.call_ids))
    if kind == "turn_finished":
        stop = events_pb2.StopReason.Name(p.stop_reason).removeprefix("STOP_REASON_").lower()
        return TurnFinished(**base, stop_reason=stop, usage=_usage(p.usage), model_requests=p.model_requests,
                            tool_calls=p.tool_calls, final_text=p.final_text)
    return ErrorOccurred(**base, reason=p.reason, message=p.message, fatal=p.fatal)


def session_state(value: int) -> str:
    return session_pb2.SessionState.Name(value).removeprefix("SESSION_STATE_").lower()
