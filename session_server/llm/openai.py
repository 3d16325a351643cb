"""OpenAI Chat Completions (and OpenAI-compatible servers: Ollama, vLLM, llama.cpp, LM Studio),
streamed over HTTP (aiohttp)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from session_server.llm.base import ChatMessage, ModelError, ModelRequest, StreamItem, excerpt, fed_items
from session_server.llm.openai_accumulator import OpenAIAccumulator
from session_server.llm.sse import SSEEvent
from session_server.llm.transport import HttpProvider
from tool_worker.tools.base import ToolSpec

KEY_ENV = "OPENAI_API_KEY"


class OpenAIProvider(HttpProvider):
    """`base_url` includes the version, e.g. https://api.openai.com/v1 or http://localhost:11434/v1.
    A given `client` is used as is (and not closed); otherwise the provider owns one."""

    PROVIDER = "OpenAI"
    PATH = "/chat/completions"
    KEY_ENV = KEY_ENV

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @staticmethod
    def request_body(request: ModelRequest) -> dict[str, Any]:
        return request_body(request)

    @staticmethod
    def decode(events: AsyncIterator[SSEEvent]) -> AsyncIterator[StreamItem]:
        return _decode(events)


def request_body(request: ModelRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": to_openai_messages(request.system, request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": request.max_tokens,
    }
    if request.tools:
        # parallel_tool_calls without tools is a 400.
        body["tools"] = [_tool(spec) for spec in request.tools]
        body["parallel_tool_calls"] = True
    return body


def to_openai_messages(system: str, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The history in Chat Completions form, system message first. Chat Completions has no error
    flag on tool results: the result text itself says what failed."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if message.role == "tool":
            out.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text})
        elif message.role == "assistant" and message.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    "content": message.text or None,
                    "tool_calls": [
                        {
                            "id": c.call_id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments_json},
                        }
                        for c in message.tool_calls
                    ],
                }
            )
        else:
            out.append({"role": message.role, "content": message.text})
    return out


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": dict(spec.parameters)},
    }


async def _decode(events: AsyncIterator[SSEEvent]) -> AsyncIterator[StreamItem]:
    accumulator = OpenAIAccumulator()
    done = False
    async for event in events:
        if event.data.strip() == "[DONE]":
            done = True
            break
        for item in fed_items(accumulator.feed, event.data, _parse(event.data)):
            yield item
    tail, response = accumulator.finish(done)
    for item in tail:
        yield item
    yield response


def _parse(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the parser goes
        raise ModelError("STREAM_ERROR", f"OpenAI stream sent a malformed chunk: {excerpt(data)}") from None
    if not isinstance(chunk, dict):
        raise ModelError("STREAM_ERROR", f"OpenAI stream sent a non-object chunk: {excerpt(data)}")
    return chunk
