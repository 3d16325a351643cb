"""The proto conversions every call crosses: durations, timestamps and results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from codelane.v1 import tools_pb2, worker_pb2, workspace_pb2
from tool_worker import snapshot_wire, wire
from tool_worker.tools.base import ErrorKind, ToolResult


@pytest.mark.parametrize("seconds", [0.0, 0.5, 1.25, 59.999999999, 3600.000001, -0.5, -1.25, -2.0])
def test_set_duration_matches_protobufs_own_normalisation(seconds: float) -> None:
    ours, theirs = duration_pb2.Duration(), duration_pb2.Duration()
    wire.set_duration(ours, seconds)
    theirs.FromNanoseconds(int(seconds * 1e9))
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert wire.seconds(ours) == pytest.approx(seconds)


@pytest.mark.parametrize("epoch", [0.0, 1_764_000_000.123456, -1.25, -0.000001])
def test_set_timestamp_matches_protobufs_own_normalisation(epoch: float) -> None:
    ours, theirs = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    wire.set_timestamp(ours, epoch)
    theirs.FromNanoseconds(int(epoch * 1e9))
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert 0 <= ours.nanos < 1_000_000_000


def test_a_result_survives_the_round_trip_built_in_place() -> None:
    result = ToolResult.error(ErrorKind.TIMEOUT, "too slow", exit_code=124, metadata={"pid": 7}, truncated=True,
                              worker_id="w1", attempt=2, queue_wait=0.25, run_time=1.5)
    report = worker_pb2.CallResult(call_id="c1", attempt=2)
    wire.result_to_proto(result, report.result)  # into the enclosing message: no copy
    back = wire.result_from_proto(worker_pb2.CallResult.FromString(report.SerializeToString()).result)
    assert back == result


def test_an_empty_result_sets_no_optional_fields() -> None:
    message = wire.result_to_proto(ToolResult(output="ok"))
    assert not message.HasField("exit_code") and not message.HasField("run_time")
    assert not message.HasField("queue_wait") and message.metadata_json == ""


def test_a_result_json_or_utf8_cannot_carry_still_converts() -> None:
    # What a plugin tool may return: metadata JSON has no type for, output with a file name read
    # with surrogateescape. The worker must still answer the call.
    result = ToolResult(output="found bad-\udcff-name.txt", metadata={"path": Path("/ws/a"), "n": 2})
    msg = wire.result_to_proto(result)
    assert msg.output == "found bad-\ufffd-name.txt"
    assert json.loads(msg.metadata_json) == {"path": "/ws/a", "n": 2}
    assert wire.result_from_proto(tools_pb2.ToolResult.FromString(msg.SerializeToString())).output == msg.output


def test_a_holding_no_server_could_name_is_ignored_and_a_long_reason_cut() -> None:
    # Kept for the worker's life and shown by ListWorkers: three of 25 MB made ListWorkers fail.
    unavailable = workspace_pb2.WORKSPACE_MODE_UNAVAILABLE
    too_long = worker_pb2.WorkspaceHolding(workspace="/" + "w" * 5000, mode=unavailable)
    assert snapshot_wire.holding_from_proto(too_long) is None
    wordy = snapshot_wire.holding_from_proto(worker_pb2.WorkspaceHolding(workspace="/ws", mode=unavailable,
                                                                         reason="r" * 100_000))
    assert wordy is not None and wordy.workspace == "/ws" and len(wordy.reason) == snapshot_wire.MAX_REASON_CHARS


@pytest.mark.parametrize(
    ("is_error", "kind", "read_as"),
    [
        (False, tools_pb2.ERROR_KIND_TOOL_ERROR, None),
        (True, tools_pb2.ERROR_KIND_UNSPECIFIED, ErrorKind.TOOL_ERROR),
        (True, 99, ErrorKind.TOOL_ERROR),
        (True, tools_pb2.ERROR_KIND_NO_WORKER, ErrorKind.TOOL_ERROR),
        (True, tools_pb2.ERROR_KIND_WORKER_LOST, ErrorKind.TOOL_ERROR),
        (True, tools_pb2.ERROR_KIND_SNAPSHOT_CHANGED, ErrorKind.SNAPSHOT_CHANGED),
        (True, tools_pb2.ERROR_KIND_TIMEOUT, ErrorKind.TIMEOUT),
    ],
)
def test_a_sent_results_error_kind_is_read_as_the_contract_says(is_error: bool, kind: int, read_as) -> None:
    # A worker claiming NO_WORKER would have the server run the call itself, as if the hub had
    # found no worker for it.
    result = wire.result_from_proto(tools_pb2.ToolResult(output="x", is_error=is_error, error_kind=kind))
    assert (result.is_error, result.error_kind) == (is_error, read_as)


def test_a_spec_a_worker_cannot_offer_is_refused_saying_what_to_set() -> None:
    with pytest.raises(ValueError, match="must be a JSON object \\(a boolean schema"):
        wire.spec_from_proto(tools_pb2.ToolSpec(name="t", parameters_json_schema="true", lane=tools_pb2.LANE_QUERY))
    with pytest.raises(ValueError, match="lane is LANE_UNSPECIFIED: set LANE_QUERY"):
        wire.spec_from_proto(tools_pb2.ToolSpec(name="t", parameters_json_schema="{}"))
    with pytest.raises(ValueError, match="lane is 7 \\(unknown\\)"):
        wire.spec_from_proto(tools_pb2.ToolSpec(name="t", parameters_json_schema="{}", lane=7))
