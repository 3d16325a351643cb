"""Anthropic Messages API, streamed over HTTP (aiohttp)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from session_server.llm.anthropic_accumulator import AnthropicAccumulator
from session_server.llm.base import ChatMessage, ModelError, ModelRequest, StreamItem, excerpt, fed_items
from session_server.llm.sse import SSEEvent
from session_server.llm.transport import HttpProvider

KEY_ENV = "ANTHROPIC_API_KEY"
API_VERSION = "2023-06-01"

# The API rejects empty text blocks, and text blocks of only whitespace (unless beside other
# text), but an empty assistant turn must stay in the history (a scripted model picks its response
# by counting assistant turns). It also rejects an error tool_result without content. Sent as
# stored, such a message would fail every later request of the session.
_EMPTY_TURN = "(no output)"


class AnthropicProvider(HttpProvider):
    """`base_url` excludes the version, e.g. https://api.anthropic.com. A given `client` is used as
    is (and not closed); otherwise the provider owns one."""

    PROVIDER = "Anthropic"
    PATH = "/v1/messages"
    KEY_ENV = KEY_ENV

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return {"anthropic-version": API_VERSION, **({"x-api-key": api_key} if api_key else {})}

    @staticmethod
    def request_body(request: ModelRequest) -> dict[str, Any]:
        return request_body(request)

    @staticmethod
    def decode(events: AsyncIterator[SSEEvent]) -> AsyncIterator[StreamItem]:
        return _decode(events)


def request_body(request: ModelRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": to_anthropic_messages(request.messages),
        "stream": True,
    }
    if request.system:
        body["system"] = request.system
    if request.tools:
        body["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
            for t in request.tools
        ]
    return body


def to_anthropic_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The history as content blocks. Tool results become `tool_result` blocks of a user message;
    consecutive user-side messages merge into one, so every result of a turn lands in the very
    next user message, as the API requires."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant":
            blocks = [{"type": "text", "text": message.text}] if message.text.strip() else []
            blocks += [
                {"type": "tool_use", "id": c.call_id, "name": c.name, "input": _input(c.arguments_json)}
                for c in message.tool_calls
            ]
            out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": _EMPTY_TURN}]})
            continue
        if message.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": message.text if message.text.strip() or not message.is_error else _EMPTY_TURN,
            }
            if message.is_error:
                block["is_error"] = True
        else:
            block = {"type": "text", "text": message.text if message.text.strip() else _EMPTY_TURN}
        if out and out[-1]["role"] == "user":
            out[-1]["content"].append(block)
        else:
            out.append({"role": "user", "content": [block]})
    return out


def _input(arguments_json: str) -> dict[str, Any]:
    """`input` must be an object; arguments that were not one were already answered with an error
    result, so the call is replayed with empty input."""
    try:
        value = json.loads(arguments_json)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return {}
    return value if isinstance(value, dict) else {}


async def _decode(events: AsyncIterator[SSEEvent]) -> AsyncIterator[StreamItem]:
    accumulator = AnthropicAccumulator()
    async for event in events:
        try:
            data = json.loads(event.data)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the parser goes
            raise ModelError(
                "STREAM_ERROR", f"Anthropic stream sent malformed data: {excerpt(event.data)}"
            ) from None
        if not isinstance(data, dict):
            raise ModelError("STREAM_ERROR", f"Anthropic stream sent non-object data: {excerpt(event.data)}")
        for item in fed_items(accumulator.feed, event.data, event.event, data):
            yield item
        if data.get("type") == "message_stop":
            break
    tail, response = accumulator.finish()
    for item in tail:
        yield item
    yield response
