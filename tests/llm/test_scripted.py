from __future__ import annotations

import time

from session_server.llm.base import ModelResponse, TextChunk, ToolCallReady
from session_server.llm.script import Script
from session_server.llm.scripted import ScriptedProvider
from tests.llm.conftest import collect, first_request, second_request


async def test_streams_text_then_calls_then_response(script: Script) -> None:
    items = await collect(ScriptedProvider(script).stream(first_request()))
    chunks = [i for i in items if isinstance(i, TextChunk)]
    ready = [i for i in items if isinstance(i, ToolCallReady)]
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert "".join(c.text for c in chunks) == response.text == "Looking around."
    assert [(r.index, r.call) for r in ready] == list(enumerate(script.responses[0].tool_calls))
    assert response.tool_calls == list(script.responses[0].tool_calls)
    assert response.stop_reason == "tool_use"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert items.index(ready[0]) > items.index(chunks[-1])


async def test_follow_up_ends_the_turn_deterministically(script: Script) -> None:
    provider = ScriptedProvider(script)
    first = await collect(provider.stream(second_request()))
    again = await collect(provider.stream(second_request()))
    assert first == again
    response = first[-1]
    assert isinstance(response, ModelResponse)
    assert response.stop_reason == "end_turn" and response.tool_calls == []
    assert 1 < sum(isinstance(i, TextChunk) for i in first) <= 4


async def test_latency_before_first_item(script: Script) -> None:
    started = time.monotonic()
    stream = ScriptedProvider(script, latency=0.05).stream(first_request())
    await anext(stream)
    assert time.monotonic() - started >= 0.05
    await stream.aclose()


async def test_a_growing_history_is_answered_as_if_counted_whole(script: Script) -> None:
    # The model counts a history once and then only what was appended to that same list: every
    # step must still answer (response and prompt tokens) as the whole history counted anew does.
    from session_server.llm.base import ChatMessage, ModelRequest
    from session_server.llm.script import estimate_tokens

    provider = ScriptedProvider(script)
    history: list[ChatMessage] = []

    async def answer(messages: list[ChatMessage]) -> tuple[str, int]:
        response = (await collect(provider.stream(ModelRequest("m", "system", messages, []))))[-1]
        return response.text, response.usage.input_tokens

    def counted_whole(messages: list[ChatMessage]) -> tuple[str, int]:
        text = "system" + "".join(m.text + "".join(c.name + c.arguments_json for c in m.tool_calls)
                                  for m in messages)
        return script.response_for(messages).text, estimate_tokens(text)

    for step in range(6):
        history.append(ChatMessage("user", f"question {step} " * (step + 1)))
        assert await answer(history) == counted_whole(history)
        history.append(ChatMessage("assistant", f"answer {step}", list(script.responses[0].tool_calls)))
        assert await answer(history) == counted_whole(history)
        assert await answer(list(history)) == counted_whole(history)
    # A list that lost messages since it was counted (not a history, which only grows) is
    # counted afresh, as is one whose last counted message was replaced.
    del history[3:]
    assert await answer(history) == counted_whole(history)
    history[-1] = ChatMessage("user", "replaced, and longer than what it replaced")
    assert await answer(history) == counted_whole(history)
