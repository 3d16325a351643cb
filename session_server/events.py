"""Session events as plain domain types, mirroring the `Event.kind` oneof of
codelane/v1/events.proto, and their JSON form in the store.

The api layer converts these to and from proto messages; everything else uses them directly.
Times are epoch seconds and durations are seconds, as floats; enums are their lower-case names
("query", "end_turn", "approved", ...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import orjson

from session_server.llm.base import Usage
from tool_worker.tools.base import ErrorKind, ToolResult


@dataclass(frozen=True)
class CallInfo:
    """One tool call of a model response, as events and history record it."""

    call_id: str
    tool_name: str
    arguments_json: str
    lane: str
    # Position of the call among the calls of its model response, from 0.
    index: int


@dataclass(frozen=True)
class TurnStarted:
    user_text: str


@dataclass(frozen=True)
class TextDelta:
    text: str
    step: int


@dataclass(frozen=True)
class ModelResponded:
    step: int
    tool_calls: list[CallInfo]
    usage: Usage
    stop_reason: str


@dataclass(frozen=True)
class ToolCallStarted:
    call: CallInfo
    lane: str
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class ToolCallFinished:
    call_id: str
    tool_name: str
    result: ToolResult
    queue_wait: float
    run_time: float


@dataclass(frozen=True)
class ConfirmationRequired:
    call: CallInfo
    deadline: float
    # Why the call waits: the rule that asked, or the default action (events stored without it: "").
    rule: str = ""


@dataclass(frozen=True)
class ConfirmationResolved:
    call_id: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class ExternalTaskInfo:
    """A call offered to clients as an external task (mirrors codelane.v1.ExternalTask)."""

    task_id: str
    session_id: str
    call: CallInfo
    lane: str
    # Claim number, from 1; a lease that expires re-offers the task with the next number.
    attempt: int
    # When the current lease ends (epoch seconds); None while unclaimed.
    lease_expire_time: float | None
    # When the task ends with a timeout result if nobody completed it.
    deadline: float
    workspace: str
    # W3C trace context of the call's span on the server; empty when it does not trace.
    traceparent: str = ""
    tracestate: str = ""


@dataclass(frozen=True)
class ExternalTaskPending:
    task: ExternalTaskInfo


@dataclass(frozen=True)
class ExternalTaskCompleted:
    task_id: str
    call_id: str
    result: ToolResult
    client_id: str


@dataclass(frozen=True)
class CallRetried:
    call_id: str
    attempt: int
    reason: str
    previous_worker_id: str


@dataclass(frozen=True)
class WorkerLost:
    worker_id: str
    reason: str
    call_ids: list[str]


@dataclass(frozen=True)
class TurnFinished:
    stop_reason: str
    usage: Usage
    model_requests: int
    tool_calls: int
    final_text: str


@dataclass(frozen=True)
class ErrorOccurred:
    reason: str
    message: str
    fatal: bool


EventPayload = (
    TurnStarted
    | TextDelta
    | ModelResponded
    | ToolCallStarted
    | ToolCallFinished
    | ConfirmationRequired
    | ConfirmationResolved
    | ExternalTaskPending
    | ExternalTaskCompleted
    | CallRetried
    | WorkerLost
    | TurnFinished
    | ErrorOccurred
)


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored and sent: its payload plus its place in the session's log."""

    session_id: str
    # From 1, gap-free and strictly increasing within the session.
    sequence: int
    time: float
    # Empty for events outside a turn.
    turn_id: str
    payload: EventPayload


# Kind names are the proto oneof field names, so the store, the api layer and clients agree.
_KIND_OF: dict[type, str] = {
    TurnStarted: "turn_started",
    TextDelta: "text_delta",
    ToolCallStarted: "tool_call_started",
    ToolCallFinished: "tool_call_finished",
    ConfirmationRequired: "confirmation_required",
    ConfirmationResolved: "confirmation_resolved",
    ExternalTaskPending: "external_task_pending",
    ExternalTaskCompleted: "external_task_completed",
    CallRetried: "call_retried",
    WorkerLost: "worker_lost",
    TurnFinished: "turn_finished",
    ErrorOccurred: "error",
    ModelResponded: "model_responded",
}
_TYPE_OF: dict[str, type] = {kind: cls for cls, kind in _KIND_OF.items()}

EVENT_KINDS: tuple[str, ...] = tuple(_KIND_OF.values())


def call_from_dict(data: dict[str, Any]) -> CallInfo:
    return CallInfo(**data)


def result_from_dict(data: dict[str, Any]) -> ToolResult:
    kind = data.get("error_kind")
    return ToolResult(**{**data, "error_kind": ErrorKind(kind) if kind else None})


def _nested_decoder(hint: Any) -> Callable[[Any], Any] | None:
    if hint is CallInfo:
        return call_from_dict
    if hint == list[CallInfo]:
        return lambda items: [call_from_dict(item) for item in items]
    if hint is Usage:
        return lambda data: Usage(**data)
    if hint is ToolResult:
        return result_from_dict
    if hint is ExternalTaskInfo:
        return lambda data: ExternalTaskInfo(**{**data, "call": call_from_dict(data["call"])})
    return None


def _field_decoders(cls: type) -> dict[str, Callable[[Any], Any]]:
    hints = get_type_hints(cls)
    decoders = {f.name: _nested_decoder(hints[f.name]) for f in dataclasses.fields(cls)}
    return {name: decode for name, decode in decoders.items() if decode is not None}


# Worked out once from the annotations, so decoding an event is a few dict lookups.
_DECODERS: dict[type, dict[str, Callable[[Any], Any]]] = {cls: _field_decoders(cls) for cls in _KIND_OF}


def _fields_of(value: Any) -> dict[str, Any] | str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.__dict__
    # What JSON has no type for (a plugin tool's metadata may hold a Path or a set) is kept as
    # its text: an event that cannot be stored would be lost with every event written beside it.
    return str(value)


# What orjson refuses, the standard library writes: strings with lone surrogates (file names read
# with surrogateescape), integers past 64 bits, dictionaries with keys that are not strings, and
# objects JSON has no type for.
_FALLBACK_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_fields_of)


def to_json(value: Any) -> str:
    """JSON text of a value the store keeps (dataclasses as objects of their fields).

    Every event and every message of a turn is encoded on its hot path: orjson, in C, takes
    about a sixth of the standard library's time on a `read` call's ToolCallFinished."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _FALLBACK_ENCODER.encode(value)


def payload_to_json(payload: EventPayload) -> tuple[str, str]:
    """The payload's kind (its proto oneof field name) and its JSON text."""
    return _KIND_OF[type(payload)], to_json(payload)


def payload_from_json(kind: str, text: str) -> EventPayload:
    """Rebuild a payload from `payload_to_json`'s output."""
    cls = _TYPE_OF.get(kind)
    if cls is None:
        raise ValueError(
            f"unknown event kind {kind!r}: the event was written by a newer codelane; upgrade this server to read it"
        )
    data = json.loads(text)
    for name, decode in _DECODERS[cls].items():
        data[name] = decode(data[name])
    return cls(**data)
