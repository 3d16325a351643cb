"""AnthropicProvider against the mock LLM over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
import pytest

from session_server.llm.anthropic import AnthropicProvider, request_body, to_anthropic_messages
from session_server.llm.base import (
    ChatMessage,
    ModelError,
    ModelResponse,
    ModelToolCall,
    TextChunk,
    ToolCallReady,
)
from session_server.llm.retry import RetryPolicy
from tests.llm.conftest import MockFactory, SleepRecorder, collect, first_request, second_request

Make = Callable[[str, RetryPolicy], AnthropicProvider]


@pytest.fixture
def provider(model_http: aiohttp.ClientSession) -> Make:
    def make(url: str, policy: RetryPolicy) -> AnthropicProvider:
        return AnthropicProvider(url, "sk-ant-secret", client=model_http, retry_policy=policy)

    return make


async def test_streams_text_calls_and_usage(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    items = await collect(provider(url, fast_policy).stream(first_request()))
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert "".join(i.text for i in items if isinstance(i, TextChunk)) == response.text == "Looking around."
    assert response.tool_calls == [
        ModelToolCall("call_0_0", "grep", '{"pattern": "def ", "path": "."}'),
        ModelToolCall("call_0_1", "read", '{"file_path": "README.md"}'),
    ]
    ready = [i for i in items if isinstance(i, ToolCallReady)]
    assert [(r.index, r.call) for r in ready] == list(enumerate(response.tool_calls))
    assert response.stop_reason == "tool_use" and response.usage.input_tokens > 0
    sent = mock.requests[0]
    assert sent.headers["x-api-key"] == "sk-ant-secret" and sent.headers["anthropic-version"] == "2023-06-01"
    assert (
        sent.body["system"] == "You are terse." and sent.body["tools"][0]["input_schema"]["type"] == "object"
    )


async def test_follow_up_merges_tool_results_into_one_user_message(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    items = await collect(provider(url, fast_policy).stream(second_request()))
    response = items[-1]
    assert isinstance(response, ModelResponse) and response.stop_reason == "end_turn"
    messages = mock.requests[0].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [b["type"] for b in messages[2]["content"]] == ["tool_result", "tool_result"]


async def test_529_is_retried(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy, sleeps: SleepRecorder
) -> None:
    mock, url = await mock_llm(fault="529", fault_count=2)
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert isinstance(items[-1], ModelResponse) and len(items[-1].tool_calls) == 2
    assert len(mock.requests) == 3 and len(sleeps.delays) == 2


async def test_529_every_time_is_overloaded(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="529", fault_count=0)
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(first_request()))
    assert error.value.reason == "OVERLOADED" and error.value.status == 529 and len(mock.requests) == 3
    assert "req_mock_3" in str(error.value)


async def test_429_honours_retry_after(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy, sleeps: SleepRecorder
) -> None:
    mock, url = await mock_llm(fault="429", retry_after=0.02)
    await collect(provider(url, fast_policy).stream(first_request()))
    assert sleeps.delays == [0.02] and len(mock.requests) == 2


async def test_500_is_retried(provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy) -> None:
    mock, url = await mock_llm(fault="500")
    await collect(provider(url, fast_policy).stream(first_request()))
    assert len(mock.requests) == 2


async def test_overloaded_event_mid_stream_is_not_retried(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="error_mid_stream")
    items = []
    with pytest.raises(ModelError) as error:
        async for item in provider(url, fast_policy).stream(first_request()):
            items.append(item)
    assert items == [TextChunk("Looking ")]
    assert error.value.reason == "OVERLOADED" and len(mock.requests) == 1


async def test_cut_stream(provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy) -> None:
    _, url = await mock_llm(fault="cut_stream", fault_count=2)
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert isinstance(items[-1], ModelResponse) and len(items[-1].tool_calls) == 2
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(second_request()))
    assert error.value.reason == "STREAM_ERROR"


async def test_missing_tool_result_is_a_400(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    request = second_request()
    broken = type(request)(request.model, request.system, request.messages[:3], request.tools)
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(broken))
    assert error.value.reason == "BAD_REQUEST" and "call_0_1" in str(error.value) and len(mock.requests) == 1


async def test_invalid_arguments_in_history_replay_as_empty_input(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    history = [
        ChatMessage("user", "go"),
        ChatMessage("assistant", "", [ModelToolCall("t1", "ls", '{"path": ')]),
        ChatMessage("tool", "invalid JSON arguments", tool_call_id="t1", is_error=True),
        ChatMessage("assistant", ""),
        ChatMessage("user", ""),
    ]
    request = type(first_request())("m", "", history, [])
    items = await collect(provider(url, fast_policy).stream(request))
    assert isinstance(items[-1], ModelResponse)
    sent = mock.requests[0].body
    assert "system" not in sent and "tools" not in sent
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]
    assert sent["messages"][2]["content"][0]["is_error"] is True


async def test_blank_text_and_empty_error_results_in_history_are_not_sent_as_the_api_refuses_them(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    """The API answers 400 to a message whose text is only whitespace, and to an error result
    with no content: sent as stored, the history would fail every later request of the session."""
    mock, url = await mock_llm()
    history = [
        ChatMessage("user", "go"),
        ChatMessage("assistant", "\n\n", [ModelToolCall("t1", "ls", "{}")]),
        ChatMessage("tool", "", tool_call_id="t1", is_error=True),
        ChatMessage("assistant", " "),
        ChatMessage("user", "again"),
    ]
    request = type(first_request())("m", "", history, [])
    items = await collect(provider(url, fast_policy).stream(request))
    assert isinstance(items[-1], ModelResponse)
    sent = mock.requests[0].body["messages"]
    assert sent[1]["content"] == [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]
    assert sent[2]["content"][0]["is_error"] is True and sent[2]["content"][0]["content"].strip()
    assert sent[3]["content"][0]["text"].strip()


def test_request_body_shape() -> None:
    body = request_body(first_request())
    assert body["max_tokens"] == 8192 and body["stream"] is True
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Find the functions."}]}
    ]


def test_user_text_after_tool_results_joins_their_message() -> None:
    messages = to_anthropic_messages([*second_request().messages, ChatMessage("user", "and then?")])
    assert [b["type"] for b in messages[-1]["content"]] == ["tool_result", "tool_result", "text"]
    assert json.dumps(messages).count('"is_error"') == 1


def test_arguments_nested_deeper_than_the_parser_goes_replay_as_empty_input() -> None:
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    history = [ChatMessage("user", "go"), ChatMessage("assistant", "", [ModelToolCall("t1", "ls", deep)])]
    messages = to_anthropic_messages(history)
    assert messages[1]["content"] == [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]
