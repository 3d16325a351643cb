"""Tool specs and results <-> their codelane.v1 protos, and the duration and timestamp helpers:
the one conversion of the tool library's types, shared by the worker process, the hub and the
session API's converter (`session_server.api.convert`)."""

from __future__ import annotations

import json
import math
import sys

from google.protobuf import duration_pb2, timestamp_pb2

from codelane.v1 import tools_pb2
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec, well_formed

LANE_TO_PROTO = {Lane.QUERY: tools_pb2.LANE_QUERY, Lane.EXECUTE: tools_pb2.LANE_EXECUTE}
LANE_FROM_PROTO = {v: k for k, v in LANE_TO_PROTO.items()}

ERROR_KIND_TO_PROTO = {kind: tools_pb2.ErrorKind.Value(f"ERROR_KIND_{kind.name}") for kind in ErrorKind}
ERROR_KIND_FROM_PROTO = {v: k for k, v in ERROR_KIND_TO_PROTO.items()}


NANOS_PER_SECOND = 1_000_000_000

# A result's metadata_json, from a worker or an external client, is kept up to this size. Parsed
# and written again it goes into the call's events and history: unbounded, a compact 46 MB array
# came back at 69 MB, over gRPC's 64 MiB message limit, and the session's history could no longer
# be read.
MAX_METADATA_JSON_CHARS = 64 * 1024
# Nesting of a result's metadata kept as parsed JSON; deeper, it is kept as the string it was.
# json.loads reads as deep as the stack allows where the result arrives, and writing it again
# deeper in the turn's stack (the history, the event log) raised RecursionError: the turn failed
# and its step (the calls, which had run, and their results) was lost from the history.
MAX_METADATA_DEPTH = 64
# The range of a google.protobuf.Duration (about 10,000 years). A result's queue_wait and run_time
# beyond it, or negative, are not measures: ~2^63 s could be stored but not sent again (its
# nanoseconds pass int64), which broke every stream, replay and history read of the session.
MAX_DURATION_SECONDS = 315_576_000_000

# protobuf's FromNanoseconds() is Python code that costs microseconds; every call's path sets a
# deadline and two durations, so these do the same normalisation directly.


def set_duration(msg: duration_pb2.Duration, seconds: float) -> None:
    """Seconds and nanos take the value's sign, as Duration requires. A value no Duration can
    carry (NaN, infinite, past its range) is written as 0, not measured: sessions stored before
    durations were checked where they arrive may hold one, and must stay readable."""
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        seconds = 0.0
    nanos = int(seconds * 1e9)
    whole, fraction = divmod(abs(nanos), NANOS_PER_SECOND)
    msg.seconds, msg.nanos = (whole, fraction) if nanos >= 0 else (-whole, -fraction)


def set_timestamp(msg: timestamp_pb2.Timestamp, epoch_seconds: float) -> None:
    """Nanos stay in [0, 1e9), as Timestamp requires (floor division does it for negatives)."""
    msg.seconds, msg.nanos = divmod(int(epoch_seconds * 1e9), NANOS_PER_SECOND)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    set_duration(d, seconds)
    return d


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def spec_to_proto(spec: ToolSpec) -> tools_pb2.ToolSpec:
    return tools_pb2.ToolSpec(
        name=spec.name,
        description=spec.description,
        parameters_json_schema=spec.parameters_json(),
        lane=LANE_TO_PROTO[spec.lane],
        idempotent=spec.idempotent,
        required_labels=dict(spec.required_labels),
    )


def spec_from_proto(msg: tools_pb2.ToolSpec) -> ToolSpec:
    """Raises ValueError when the schema is not a JSON object or the lane is not QUERY/EXECUTE."""
    try:
        parameters = json.loads(msg.parameters_json_schema or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool {msg.name!r}: parameters_json_schema is not valid JSON ({exc})") from None
    except RecursionError:  # `[[[[...` deeper than the parser goes: a worker's Hello, not the server's fault
        raise ValueError(f"tool {msg.name!r}: parameters_json_schema is nested too deeply to read") from None
    except ValueError:  # not a JSONDecodeError: an integer longer than Python reads
        raise ValueError(
            f"tool {msg.name!r}: parameters_json_schema holds an integer of more than "
            f"{sys.get_int_max_str_digits():,} digits, longer than the server reads: use a shorter number"
        ) from None
    if not isinstance(parameters, dict):
        raise ValueError(f"tool {msg.name!r}: parameters_json_schema must be a JSON object (a boolean schema, "
                         "true or false, is not accepted)")
    if msg.lane not in LANE_FROM_PROTO:
        lane = tools_pb2.Lane.Name(msg.lane) if msg.lane in tools_pb2.Lane.values() else f"{msg.lane} (unknown)"
        raise ValueError(f"tool {msg.name!r}: lane is {lane}: set LANE_QUERY (a worker's tools are Query tools) "
                         "or LANE_EXECUTE")
    return ToolSpec(
        name=msg.name,
        description=msg.description,
        parameters=parameters,
        lane=LANE_FROM_PROTO[msg.lane],
        idempotent=msg.idempotent,
        required_labels=dict(msg.required_labels),
    )


def result_to_proto(result: ToolResult, msg: tools_pb2.ToolResult | None = None) -> tools_pb2.ToolResult:
    """Fills `msg` (a field of an enclosing message, which saves a copy) or a new message."""
    if msg is None:
        msg = tools_pb2.ToolResult()
    try:
        msg.output = result.output
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot carry: see `well_formed`
        msg.output = well_formed(result.output)
    msg.is_error = result.is_error
    msg.truncated = result.truncated
    msg.worker_id = result.worker_id
    msg.attempt = result.attempt
    if result.metadata:
        # A plugin may return what JSON has no type for (a Path, a set): its text, not a lost result.
        msg.metadata_json = json.dumps(result.metadata, default=str)
    if result.error_kind is not None:
        msg.error_kind = ERROR_KIND_TO_PROTO[result.error_kind]
    if result.exit_code is not None:
        msg.exit_code = result.exit_code
    if result.queue_wait:
        set_duration(msg.queue_wait, result.queue_wait)
    if result.run_time:
        set_duration(msg.run_time, result.run_time)
    return msg


def _not_json(name: str) -> float:
    """NaN, Infinity and -Infinity, which Python's json reads and writes back but JSON has not."""
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number; ValueError for one past a double's range (1e400 reads as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is past a double's range")
    return value


def omitted_metadata(chars: int) -> dict[str, str]:
    """What is kept of a result's metadata_json of `chars` characters, over MAX_METADATA_JSON_CHARS."""
    return {"omitted_by_codelane": f"metadata_json was {chars:,} characters; at most {MAX_METADATA_JSON_CHARS:,} "
                                   "are kept"}


# Outcomes only the hub decides (it lost the call's worker, or found none): the hub acts on them
# (a call that found no worker may run on the server), so a worker's or a client's claim of one
# is read as the tool's own failure.
HUB_OUTCOMES = frozenset({ErrorKind.WORKER_LOST, ErrorKind.NO_WORKER})


def result_from_proto(msg: tools_pb2.ToolResult) -> ToolResult:
    """The result a worker or an external client sent. Metadata over MAX_METADATA_JSON_CHARS is
    replaced by a note saying so; metadata that is not JSON (or nests deeper than MAX_METADATA_DEPTH) is
    kept as the string it was. Its error_kind as tools.proto's ToolResult says it is read: none on
    a success; TOOL_ERROR for a failure without one, with one this code does not know, or with
    one of HUB_OUTCOMES."""
    if len(msg.metadata_json) > MAX_METADATA_JSON_CHARS:
        metadata: object = omitted_metadata(len(msg.metadata_json))
    elif msg.metadata_json:
        try:
            metadata = json.loads(msg.metadata_json, parse_constant=_not_json, parse_float=_finite)
            parsed = _depth(metadata) <= MAX_METADATA_DEPTH
        except (ValueError, RecursionError):
            parsed = False
        if not parsed:
            metadata = {"unparsed_metadata": msg.metadata_json}
    else:
        metadata = {}
    if not msg.is_error:
        error_kind = None  # a kind on a successful result would read as a failure's reason
    else:
        error_kind = ERROR_KIND_FROM_PROTO.get(msg.error_kind)
        if error_kind is None or error_kind in HUB_OUTCOMES:
            error_kind = ErrorKind.TOOL_ERROR
    return ToolResult(
        output=msg.output,
        is_error=msg.is_error,
        error_kind=error_kind,
        exit_code=msg.exit_code if msg.HasField("exit_code") else None,
        truncated=msg.truncated,
        metadata=metadata if isinstance(metadata, dict) else {"metadata": metadata},
        worker_id=msg.worker_id,
        attempt=msg.attempt or 1,
        queue_wait=_measured(msg.queue_wait),
        run_time=_measured(msg.run_time),
    )


def _depth(value: object) -> int:
    """How deeply `value` (parsed JSON) nests arrays and objects, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _measured(d: duration_pb2.Duration) -> float:
    """A duration a worker or client reported, or 0 (not measured: the call's owner times it)
    when it cannot be one."""
    value = seconds(d)
    return value if 0 <= value <= MAX_DURATION_SECONDS else 0.0
