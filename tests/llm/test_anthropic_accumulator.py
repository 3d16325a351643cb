from __future__ import annotations

from typing import Any

import pytest

from session_server.llm.anthropic_accumulator import AnthropicAccumulator
from session_server.llm.base import ModelError, ModelToolCall, TextChunk, ToolCallReady, Usage

START = {
    "type": "message_start",
    "message": {
        "usage": {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
            "output_tokens": 1,
        }
    },
}


def tool_events(index: int, call_id: str, name: str, parts: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": p},
            }
            for p in parts
        ),
        {"type": "content_block_stop", "index": index},
    ]


def feed_all(accumulator: AnthropicAccumulator, events: list[dict[str, Any]]) -> list[Any]:
    items: list[Any] = []
    for event in events:
        items += accumulator.feed(event["type"], event)
    return items


def test_text_and_tool_calls_ready_at_block_stop() -> None:
    accumulator = AnthropicAccumulator()
    text = [
        START,
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "some_future_event", "index": 0},
    ]
    assert feed_all(accumulator, text) == [TextChunk("Hi")]
    first = tool_events(1, "t1", "grep", ["", '{"pattern":', ' "x"}'])
    items = feed_all(accumulator, first[:-1])
    assert items == []
    assert accumulator.feed("content_block_stop", first[-1]) == [
        ToolCallReady(0, ModelToolCall("t1", "grep", '{"pattern": "x"}'))
    ]
    items = feed_all(
        accumulator,
        [
            *tool_events(2, "t2", "ls", []),
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}},
            {"type": "message_stop"},
        ],
    )
    # No arguments came: ready only once the stop reason says the block was not cut off.
    assert items == []
    tail, response = accumulator.finish()
    assert tail == [ToolCallReady(1, ModelToolCall("t2", "ls", "{}"))]
    assert response.text == "Hi" and [c.call_id for c in response.tool_calls] == ["t1", "t2"]
    assert response.usage == Usage(input_tokens=115, output_tokens=30, cached_input_tokens=100)
    assert response.stop_reason == "tool_use"


def test_thinking_blocks_and_unknown_deltas_are_ignored() -> None:
    accumulator = AnthropicAccumulator()
    items = feed_all(
        accumulator,
        [
            START,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hmm"},
            },
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
            {"type": "message_stop"},
        ],
    )
    assert items == []
    assert accumulator.finish()[1].stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("kind", "reason"), [("overloaded_error", "OVERLOADED"), ("api_error", "SERVER_ERROR")]
)
def test_error_event(kind: str, reason: str) -> None:
    accumulator = AnthropicAccumulator()
    with pytest.raises(ModelError) as error:
        accumulator.feed("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})
    assert error.value.reason == reason and "Overloaded" in str(error.value)


def test_cut_stream_with_finished_tool_calls_is_accepted() -> None:
    accumulator = AnthropicAccumulator()
    feed_all(accumulator, [START, *tool_events(0, "t1", "ls", ["{}"])])
    assert accumulator.finish()[1].tool_calls == [ModelToolCall("t1", "ls", "{}")]


def test_cut_stream_after_its_stop_reason_is_accepted() -> None:
    # message_delta carries the stop reason once every block is done; only message_stop is
    # missing (OpenAI's stream, cut after its finish_reason, was accepted already).
    accumulator = AnthropicAccumulator()
    feed_all(accumulator, [
        START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "All done."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
    ])
    _, response = accumulator.finish()
    assert (response.text, response.tool_calls, response.stop_reason) == ("All done.", [], "end_turn")


@pytest.mark.parametrize(
    "events",
    [
        [START, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}],
        [START, *tool_events(0, "t1", "ls", ["{}"]), *tool_events(1, "t2", "ls", ['{"p"'])[:-1]],
    ],
)
def test_cut_stream_otherwise_is_an_error(events: list[dict[str, Any]]) -> None:
    accumulator = AnthropicAccumulator()
    feed_all(accumulator, events)
    with pytest.raises(ModelError, match="ended early"):
        accumulator.finish()


@pytest.mark.parametrize("stop_reason", ["max_tokens", "model_context_window_exceeded", "refusal"])
@pytest.mark.parametrize("parts", [[], [""], ["", '{"path": "s']])
def test_a_call_cut_off_by_max_tokens_is_marked_and_not_ready_before_the_end(
    parts: list[str], stop_reason: str
) -> None:
    accumulator = AnthropicAccumulator()
    events = [
        START,
        *tool_events(0, "t1", "grep", ["", '{"pattern": "x"}']),
        *tool_events(1, "t2", "ls", parts),
        {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 30}},
        {"type": "message_stop"},
    ]
    assert feed_all(accumulator, events) == [ToolCallReady(0, ModelToolCall("t1", "grep", '{"pattern": "x"}'))]
    tail, response = accumulator.finish()
    [ready] = tail
    assert ready.index == 1 and ready.call.cut_off and ready.call.name == "ls"
    assert response.tool_calls == [response.tool_calls[0], ready.call] and not response.tool_calls[0].cut_off
    assert response.stop_reason == stop_reason


def test_max_tokens_after_a_complete_call_or_in_later_text_cuts_no_call() -> None:
    accumulator = AnthropicAccumulator()
    events = [
        START,
        *tool_events(0, "t1", "ls", []),
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "and"}},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 30}},
        {"type": "message_stop"},
    ]
    feed_all(accumulator, events)
    tail, response = accumulator.finish()
    assert tail == [ToolCallReady(0, ModelToolCall("t1", "ls", "{}"))] and response.tool_calls == [tail[0].call]
