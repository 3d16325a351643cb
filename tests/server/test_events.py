import pytest

from codelane.v1 import events_pb2
from session_server.events import (
    EVENT_KINDS,
    CallInfo,
    CallRetried,
    ConfirmationRequired,
    ConfirmationResolved,
    ErrorOccurred,
    EventPayload,
    ExternalTaskCompleted,
    ExternalTaskInfo,
    ExternalTaskPending,
    ModelResponded,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
    WorkerLost,
    payload_from_json,
    payload_to_json,
)
from session_server.llm.base import Usage
from tool_worker.tools.base import ErrorKind, ToolResult

CALL = CallInfo(
    call_id="c1", tool_name="read", arguments_json='{"path": "a.py", "n": 12345678901234567}', lane="query", index=0
)
OK = ToolResult(output="line 1\n", exit_code=0, metadata={"lines": 1}, worker_id="w1", attempt=2, queue_wait=0.5)
FAILED = ToolResult.error(ErrorKind.TIMEOUT, "timed out after 30 s", truncated=True)

SAMPLES: dict[str, EventPayload] = {
    "turn_started": TurnStarted(user_text="fix the bug ✓"),
    "text_delta": TextDelta(text="Looking", step=0),
    "model_responded": ModelResponded(
        step=1,
        tool_calls=[CALL, CallInfo("c2", "bash", "{}", "execute", 1)],
        usage=Usage(input_tokens=100, output_tokens=20, cached_input_tokens=64),
        stop_reason="tool_calls",
    ),
    "tool_call_started": ToolCallStarted(call=CALL, lane="query", worker_id="w1", attempt=1),
    "tool_call_finished": ToolCallFinished(call_id="c1", tool_name="read", result=OK, queue_wait=0.001, run_time=0.25),
    "confirmation_required": ConfirmationRequired(call=CALL, deadline=1_700_000_000.125),
    "confirmation_resolved": ConfirmationResolved(call_id="c1", outcome="timed_out_rejected", reason="no answer"),
    "external_task_pending": ExternalTaskPending(
        task=ExternalTaskInfo(
            task_id="t1", session_id="s1", call=CALL, lane="query", attempt=1, lease_expire_time=None,
            deadline=1_700_000_600.5, workspace="/ws",
        )
    ),
    "external_task_completed": ExternalTaskCompleted(task_id="t1", call_id="c1", result=FAILED, client_id=""),
    "call_retried": CallRetried(call_id="c1", attempt=2, reason="worker lost", previous_worker_id="w1"),
    "worker_lost": WorkerLost(worker_id="w1", reason="heartbeats missed", call_ids=["c1", "c3"]),
    "turn_finished": TurnFinished(
        stop_reason="end_turn", usage=Usage(1, 2, 0), model_requests=2, tool_calls=3, final_text="done"
    ),
    "error": ErrorOccurred(reason="MODEL_ERROR", message="provider said 500", fatal=True),
}


def test_kinds_are_the_proto_oneof_fields() -> None:
    oneof = events_pb2.Event.DESCRIPTOR.oneofs_by_name["kind"]
    assert set(EVENT_KINDS) == {f.name for f in oneof.fields}
    assert set(SAMPLES) == set(EVENT_KINDS)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_kind_round_trips(kind: str) -> None:
    payload = SAMPLES[kind]
    got_kind, text = payload_to_json(payload)
    assert got_kind == kind
    back = payload_from_json(got_kind, text)
    assert back == payload
    assert type(back) is type(payload)


def test_nested_types_are_rebuilt() -> None:
    back = payload_from_json(*payload_to_json(SAMPLES["external_task_completed"]))
    assert isinstance(back, ExternalTaskCompleted)
    assert back.result.error_kind is ErrorKind.TIMEOUT
    back = payload_from_json(*payload_to_json(SAMPLES["model_responded"]))
    assert isinstance(back, ModelResponded)
    assert all(isinstance(call, CallInfo) for call in back.tool_calls)
    assert isinstance(back.usage, Usage)
    back = payload_from_json(*payload_to_json(SAMPLES["external_task_pending"]))
    assert isinstance(back, ExternalTaskPending)
    assert isinstance(back.task, ExternalTaskInfo) and isinstance(back.task.call, CallInfo)


def test_unknown_kind_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="newer codelane"):
        payload_from_json("telepathy", "{}")
