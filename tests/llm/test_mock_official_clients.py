"""The mock's wire format is checked by the official `openai` and `anthropic` packages."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.llm.conftest import MockFactory

USER = [{"role": "user", "content": "Find the functions."}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}]
EXPECTED = [("grep", {"pattern": "def ", "path": "."}), ("read", {"file_path": "README.md"})]
FOLLOW_UP = [
    *USER,
    {
        "role": "assistant",
        "content": "Looking around.",
        "tool_calls": [
            {"id": "call_0_0", "type": "function", "function": {"name": "grep", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_0_0", "content": "a.py:1:def f()"},
]


@pytest.fixture
def http() -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=False)  # the SDKs close it


async def test_openai_stream_helper_accumulates_text_and_tool_calls(
    mock_llm: MockFactory, http: httpx.AsyncClient
) -> None:
    _, url = await mock_llm()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", http_client=http) as client:
        async with client.chat.completions.stream(
            model="m",
            messages=USER,
            tools=OPENAI_TOOLS,
            parallel_tool_calls=True,
            stream_options={"include_usage": True},
        ) as stream:
            completion = await stream.get_final_completion()
    message = completion.choices[0].message
    assert message.content == "Looking around." and completion.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == EXPECTED
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


async def test_openai_raw_chunks_and_text_turn(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", http_client=http) as client:
        stream = await client.chat.completions.create(model="m", messages=FOLLOW_UP, stream=True)
        chunks = [chunk async for chunk in stream]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "All done, nothing else to change."
    )
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_non_streaming(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", http_client=http) as client:
        completion = await client.chat.completions.create(model="m", messages=USER)
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED


async def test_openai_sees_the_history_400(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm()
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="x", http_client=http, max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(model="m", messages=FOLLOW_UP[:2])
    assert error.value.param == "messages.[2].role" and "call_0_0" in error.value.message


async def test_openai_sdk_retries_the_mock_429(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    mock, url = await mock_llm(fault="429", retry_after=0.01)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", http_client=http) as client:
        await client.chat.completions.create(model="m", messages=USER)
    assert len(mock.requests) == 2


async def test_anthropic_stream_helper(mock_llm: MockFactory) -> None:
    _, url = await mock_llm()
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x") as client:
        async with client.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
            text = "".join([t async for t in stream.text_stream])
            message = await stream.get_final_message()
    assert text == "Looking around." and message.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == EXPECTED
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


async def test_anthropic_raw_events_and_text_turn(mock_llm: MockFactory) -> None:
    _, url = await mock_llm()
    history = [
        *USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "grep", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ]
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x") as client:
        stream = await client.messages.create(model="m", max_tokens=100, messages=history, stream=True)
        events = [event async for event in stream]
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    text = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "All done, nothing else to change."


async def test_anthropic_non_streaming_and_400(mock_llm: MockFactory) -> None:
    _, url = await mock_llm()
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client:
        message = await client.messages.create(model="m", max_tokens=100, messages=USER)
        assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
        dangling = [
            *USER,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "g", "input": {}}]},
            {"role": "user", "content": "no result"},
        ]
        with pytest.raises(anthropic.BadRequestError) as error:
            await client.messages.create(model="m", max_tokens=100, messages=dangling)
    assert "t1" in error.value.message and "tool_result" in error.value.message


async def test_anthropic_sdk_sees_the_overloaded_event(mock_llm: MockFactory) -> None:
    _, url = await mock_llm(fault="error_mid_stream")
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x") as client:
        stream = await client.messages.create(model="m", max_tokens=100, messages=USER, stream=True)
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async for _ in stream:
                pass
