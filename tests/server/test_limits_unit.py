"""The last safety net on events: an oversized event is cut, a normal one untouched."""

from __future__ import annotations

import dataclasses

from session_server.events import CallInfo, ModelResponded, TextDelta, ToolCallFinished, payload_to_json
from session_server.limits import MAX_EVENT_CHARS, bound_event, cut
from session_server.llm.base import Usage
from tool_worker.tools.base import MAX_RESULT_OUTPUT_CHARS, ToolResult, bound_result


def test_a_normal_event_is_the_same_object() -> None:
    event = ToolCallFinished("c", "read", ToolResult(output="ok", metadata={"n": 1}), 0.0, 0.0)
    assert bound_event(event) is event


def test_an_oversized_event_is_cut_below_the_limit() -> None:
    huge = "x" * (MAX_EVENT_CHARS + 10)
    for event in (
        TextDelta(huge, 0),
        ToolCallFinished("c", "read", ToolResult(output=huge, metadata={"k": huge}), 0.0, 0.0),
        ModelResponded(0, [CallInfo("c", "write", huge, "execute", 0)], Usage(), "tool_use"),
    ):
        bounded = bound_event(event)
        assert type(bounded) is type(event)
        assert len(payload_to_json(bounded)[1]) < 1024 * 1024
        assert "cut by codelane" in payload_to_json(bounded)[1]


def test_many_small_strings_add_up() -> None:
    calls = [CallInfo(f"c{i}", "write", "y" * 100_000, "execute", i) for i in range(100)]
    event = ModelResponded(0, calls, Usage(), "tool_use")
    bounded = bound_event(event)
    assert bounded is not event and len(payload_to_json(bounded)[1]) < MAX_EVENT_CHARS


def test_a_long_result_is_cut_and_marked_without_changing_the_original() -> None:
    original = ToolResult(output="z" * (MAX_RESULT_OUTPUT_CHARS + 5))
    bounded = bound_result(original)
    assert bounded.truncated and len(bounded.output) < MAX_RESULT_OUTPUT_CHARS + 200
    assert len(original.output) == MAX_RESULT_OUTPUT_CHARS + 5 and not original.truncated
    assert bound_result(dataclasses.replace(original, output="short")).output == "short"
    assert cut("abc", 5, "x") == "abc" and cut("abcdef", 3, "text").startswith("abc\n[... text cut by codelane: 3 of 6")
