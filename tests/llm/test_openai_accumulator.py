"""The OpenAI stream accumulator against every quirk listed in LLM_WIRE.md."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from session_server.llm.base import ModelError, ModelToolCall, TextChunk, ToolCallReady, Usage
from session_server.llm.openai_accumulator import OpenAIAccumulator


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


def calls(*entries: dict[str, Any]) -> dict[str, Any]:
    return chunk({"tool_calls": list(entries)})


def new_accumulator() -> OpenAIAccumulator:
    counter = itertools.count()
    return OpenAIAccumulator(new_id=lambda: f"gen_{next(counter)}")


def run(chunks: list[dict[str, Any]], done: bool = True) -> tuple[list[Any], Any]:
    """Feed everything; return every streamed item and the response."""
    accumulator = new_accumulator()
    items: list[Any] = []
    for c in chunks:
        items += accumulator.feed(c)
    tail, response = accumulator.finish(done)
    return items + tail, response


def names_and_args(response: Any) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments_json)) for c in response.tool_calls]


def test_standard_stream_reports_a_call_when_the_next_one_starts() -> None:
    accumulator = new_accumulator()
    assert accumulator.feed(chunk({"role": "assistant", "content": ""})) == []
    assert accumulator.feed(chunk({"content": "Hi "})) == [TextChunk("Hi ")]
    accumulator.feed(
        calls({"index": 0, "id": "a", "type": "function", "function": {"name": "grep", "arguments": ""}})
    )
    assert accumulator.feed(calls({"index": 0, "function": {"arguments": '{"pattern":'}})) == []
    assert accumulator.feed(calls({"index": 0, "function": {"arguments": ' "x"}'}})) == []
    started = accumulator.feed(calls({"index": 1, "id": "b", "function": {"name": "read", "arguments": ""}}))
    assert started == [ToolCallReady(0, ModelToolCall("a", "grep", '{"pattern": "x"}'))]
    accumulator.feed(calls({"index": 1, "function": {"arguments": '{"file_path": "f"}'}}))
    accumulator.feed(chunk(finish="tool_calls"))
    accumulator.feed(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        }
    )
    tail, response = accumulator.finish(done=True)
    assert tail == [ToolCallReady(1, ModelToolCall("b", "read", '{"file_path": "f"}'))]
    assert response.text == "Hi "
    assert response.tool_calls == [started[0].call, tail[0].call]
    assert response.usage == Usage(10, 5, 4)
    assert response.stop_reason == "tool_use"


def test_ollama_whole_calls_all_at_index_zero_in_separate_chunks() -> None:
    items, response = run(
        [
            calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": '{"path": "."}'}}),
            calls({"index": 0, "id": "b", "function": {"name": "ls", "arguments": '{"path": "src"}'}}),
            chunk(finish="tool_calls"),
        ]
    )
    assert [(c.call_id, c.arguments_json) for c in response.tool_calls] == [
        ("a", '{"path": "."}'),
        ("b", '{"path": "src"}'),
    ]
    assert [i.index for i in items if isinstance(i, ToolCallReady)] == [0, 1]


def test_ollama_several_calls_in_one_chunk_with_index_zero() -> None:
    _, response = run(
        [
            calls(
                {"index": 0, "id": "a", "function": {"name": "ls", "arguments": "{}"}},
                {"index": 0, "id": "b", "function": {"name": "read", "arguments": '{"f": 1}'}},
            )
        ]
    )
    assert [(c.call_id, c.name) for c in response.tool_calls] == [("a", "ls"), ("b", "read")]


def test_missing_index_keys_by_position() -> None:
    _, response = run(
        [
            calls(
                {"id": "a", "function": {"name": "ls", "arguments": "{}"}},
                {"id": "b", "function": {"name": "read", "arguments": '{"f": 1}'}},
            ),
            chunk(finish="tool_calls"),
        ]
    )
    assert [(c.call_id, c.name) for c in response.tool_calls] == [("a", "ls"), ("b", "read")]


def test_missing_index_across_chunks_splits_on_a_new_id() -> None:
    _, response = run(
        [
            calls({"id": "a", "function": {"name": "ls", "arguments": ""}}),
            calls({"function": {"arguments": '{"path": '}}),
            calls({"function": {"arguments": '"."}'}}),
            calls({"id": "b", "function": {"name": "read", "arguments": ""}}),
            calls({"function": {"arguments": '{"f": 1}'}}),
        ]
    )
    assert names_and_args(response) == [("ls", {"path": "."}), ("read", {"f": 1})]


def test_native_object_arguments_without_ids_at_index_zero() -> None:
    items, response = run(
        [
            calls({"function": {"name": "ls", "arguments": {"path": "."}}}),
            calls({"function": {"name": "ls", "arguments": {"path": "src"}}}),
        ]
    )
    assert names_and_args(response) == [("ls", {"path": "."}), ("ls", {"path": "src"})]
    assert [c.call_id for c in response.tool_calls] == ["gen_0", "gen_1"]
    assert [i.call for i in items if isinstance(i, ToolCallReady)] == response.tool_calls


def test_vllm_no_ids_and_name_in_every_delta() -> None:
    _, response = run(
        [
            calls({"index": 0, "function": {"name": "grep", "arguments": ""}}),
            calls({"index": 0, "function": {"name": "grep", "arguments": '{"pattern"'}}),
            calls({"index": 0, "function": {"name": "grep", "arguments": ': "x"}'}}),
            calls({"index": 0, "function": {"name": "grep"}}),
            calls({"index": 1, "function": {"name": "ls", "arguments": "{}"}}),
        ]
    )
    assert names_and_args(response) == [("grep", {"pattern": "x"}), ("ls", {})]
    assert [c.call_id for c in response.tool_calls] == ["gen_0", "gen_1"]


def test_vllm_tool_without_any_arguments_delta_gets_empty_object() -> None:
    _, response = run(
        [calls({"index": 0, "id": "a", "function": {"name": "ls"}}), chunk(finish="tool_calls")]
    )
    assert response.tool_calls == [ModelToolCall("a", "ls", "{}")]


def test_llama_cpp_id_inside_function() -> None:
    _, response = run([calls({"index": 0, "function": {"id": "fid", "name": "ls", "arguments": "{}"}})])
    assert response.tool_calls == [ModelToolCall("fid", "ls", "{}")]


def test_lm_studio_empty_names_and_a_new_id_on_every_chunk() -> None:
    _, response = run(
        [
            calls({"index": 0, "id": "id1", "function": {"name": "grep", "arguments": ""}}),
            calls({"index": 0, "id": "id2", "function": {"name": "", "arguments": '{"pat'}}),
            calls({"index": 0, "id": "id3", "function": {"name": "", "arguments": 'tern": "x"}'}}),
        ]
    )
    assert response.tool_calls == [ModelToolCall("id1", "grep", '{"pattern": "x"}')]


def test_finish_reason_stop_with_calls_is_still_tool_use() -> None:
    _, response = run(
        [calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": "{}"}}), chunk(finish="stop")]
    )
    assert response.stop_reason == "tool_use" and len(response.tool_calls) == 1


def test_finish_reason_tool_calls_without_calls_is_end_turn() -> None:
    _, response = run([chunk({"content": "hi"}), chunk(finish="tool_calls")])
    assert response.stop_reason == "end_turn" and response.tool_calls == []


def test_length_finish_is_max_tokens() -> None:
    _, response = run([chunk({"content": "hi"}), chunk(finish="length")])
    assert response.stop_reason == "max_tokens"


@pytest.mark.parametrize(("finish", "stop_reason"), [("length", "max_tokens"), ("content_filter", "content_filter")])
@pytest.mark.parametrize("arguments", ["", '{"path": "s'])
def test_a_call_cut_off_by_length_is_marked(arguments: str, finish: str, stop_reason: str) -> None:
    items, response = run(
        [
            calls({"index": 0, "id": "a", "function": {"name": "grep", "arguments": '{"pattern": "x"}'}}),
            calls({"index": 1, "id": "b", "function": {"name": "ls", "arguments": arguments}}),
            chunk(finish=finish),
        ]
    )
    assert [c.cut_off for c in response.tool_calls] == [False, True]
    assert [r.call for r in items] == response.tool_calls and response.stop_reason == stop_reason


def test_length_after_complete_calls_cuts_none() -> None:
    _, response = run(
        [calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": "{}"}}), chunk(finish="length")]
    )
    assert response.tool_calls == [ModelToolCall("a", "ls", "{}")] and response.stop_reason == "max_tokens"


def test_a_call_is_not_reported_early_while_an_earlier_one_is_incomplete() -> None:
    accumulator = new_accumulator()
    accumulator.feed(calls({"index": 0, "id": "a", "function": {"name": "grep", "arguments": '{"p": '}}))
    assert (
        accumulator.feed(calls({"index": 1, "id": "b", "function": {"name": "ls", "arguments": "{}"}})) == []
    )
    assert accumulator.feed(calls({"index": 0, "function": {"arguments": "1}"}})) == []
    tail, response = accumulator.finish(done=True)
    assert [(r.index, r.call.name) for r in tail] == [(0, "grep"), (1, "ls")]
    assert names_and_args(response) == [("grep", {"p": 1}), ("ls", {})]


def test_invalid_argument_json_is_kept_for_the_loop_to_reject() -> None:
    _, response = run(
        [
            calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": '{"path": '}}),
            chunk(finish="tool_calls"),
        ]
    )
    assert response.tool_calls == [ModelToolCall("a", "ls", '{"path":')]


def test_eof_without_done_after_finish_reason_is_accepted() -> None:
    _, response = run([chunk({"content": "hi"}), chunk(finish="stop")], done=False)
    assert response.text == "hi"


def test_cut_stream_with_complete_calls_is_accepted() -> None:
    _, response = run(
        [calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": "{}"}})], done=False
    )
    assert response.tool_calls == [ModelToolCall("a", "ls", "{}")]


@pytest.mark.parametrize(
    "chunks",
    [
        [chunk({"content": "half a sent"})],
        [calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": '{"path": '}})],
    ],
)
def test_cut_stream_with_text_only_or_incomplete_calls_is_an_error(chunks: list[dict[str, Any]]) -> None:
    with pytest.raises(ModelError) as error:
        run(chunks, done=False)
    assert error.value.reason == "STREAM_ERROR"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"error": {"message": "boom", "type": "server_error", "code": None}}, "SERVER_ERROR"),
        ({"error": {"message": "slow down", "type": "rate_limit_error"}}, "RATE_LIMITED"),
        ({"error": {"message": "weird"}}, "STREAM_ERROR"),
        (
            {"object": "error", "message": "bad schema", "type": "BadRequestError", "code": 400},
            "STREAM_ERROR",
        ),
    ],
)
def test_error_chunk_mid_stream(payload: dict[str, Any], reason: str) -> None:
    accumulator = new_accumulator()
    accumulator.feed(chunk({"content": "hi"}))
    with pytest.raises(ModelError) as error:
        accumulator.feed(payload)
    assert error.value.reason == reason
    assert str(payload.get("error", payload)["message"]) in str(error.value)


def test_null_usage_and_other_choices_are_ignored() -> None:
    _, response = run(
        [
            chunk({"content": "a"}, usage=None),
            {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
            {
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None},
            },
        ]
    )
    assert response.text == "a" and response.usage == Usage(3, 1, 0)


def test_ids_are_generated_when_none_come() -> None:
    accumulator = OpenAIAccumulator()
    accumulator.feed(calls({"index": 0, "function": {"name": "ls", "arguments": "{}"}}))
    accumulator.feed(calls({"index": 1, "function": {"name": "ls", "arguments": "{}"}}))
    _, response = accumulator.finish(done=True)
    ids = [c.call_id for c in response.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2


@pytest.mark.parametrize(
    "parts",
    [
        ['{"code": "if x {', "}", " else {}", '"}'],
        ['{"a": "say \\"}', '\\" ok", "b": {"c": ', "1}", "}"],
    ],
)
def test_braces_inside_strings_do_not_end_a_call_early(parts: list[str]) -> None:
    # LM Studio sends a new id on every chunk: only truly complete arguments may open a new call.
    accumulator = new_accumulator()
    items = []
    for n, part in enumerate(parts):
        items += accumulator.feed(
            calls({"index": 0, "id": f"id{n}", "function": {"name": "w", "arguments": part}})
        )
    _, response = accumulator.finish(done=True)
    assert items == [] and len(response.tool_calls) == 1
    assert json.loads(response.tool_calls[0].arguments_json) == json.loads("".join(parts))


def test_arguments_that_are_not_an_object_never_count_as_complete() -> None:
    accumulator = new_accumulator()
    accumulator.feed(calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": "[1]"}}))
    assert accumulator.feed(calls({"index": 0, "id": "b", "function": {"arguments": "{}"}})) == []
    _, response = accumulator.finish(done=True)
    assert response.tool_calls == [ModelToolCall("a", "ls", "[1]{}")]


def test_arguments_nested_deeper_than_the_parser_goes_are_kept_for_the_loop_to_reject() -> None:
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _, response = run(
        [
            calls({"index": 0, "id": "a", "function": {"name": "ls", "arguments": deep}}),
            calls({"index": 1, "id": "b", "function": {"name": "ls", "arguments": "{}"}}),
            chunk(finish="tool_calls"),
        ]
    )
    assert [c.arguments_json for c in response.tool_calls] == [deep, "{}"]
