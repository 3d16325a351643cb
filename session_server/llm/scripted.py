"""An in-process model that replays a Script: deterministic, no network, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from session_server.llm.base import (
    ModelRequest,
    ModelResponse,
    StreamItem,
    TextChunk,
    ToolCallReady,
    Usage,
)
from session_server.llm.script import Script, estimate_tokens, split_words

# Text is streamed in at most this many chunks: enough to exercise streaming consumers.
_MAX_TEXT_CHUNKS = 4


class ScriptedProvider:
    """Streams the scripted response for each request; `latency` seconds pass before the first item."""

    def __init__(self, script: Script, latency: float = 0.0) -> None:
        self.script = script
        self.latency = latency

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        response = self.script.response_for(request.messages)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        for chunk in _chunks(response.text, _MAX_TEXT_CHUNKS):
            yield TextChunk(chunk)
        for index, call in enumerate(response.tool_calls):
            yield ToolCallReady(index, call)
        output = response.text + "".join(c.name + c.arguments_json for c in response.tool_calls)
        yield ModelResponse(
            text=response.text,
            tool_calls=list(response.tool_calls),
            usage=Usage(input_tokens=_prompt_tokens(request), output_tokens=estimate_tokens(output)),
            stop_reason="tool_use" if response.tool_calls else "end_turn",
        )

    async def aclose(self) -> None:
        return None


def _chunks(text: str, count: int) -> list[str]:
    words = split_words(text)
    size = max(1, -(-len(words) // count))
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def _prompt_tokens(request: ModelRequest) -> int:
    parts = [request.system, *(json.dumps(dict(t.parameters)) + t.description for t in request.tools)]
    for message in request.messages:
        parts.append(message.text)
        parts.extend(c.name + c.arguments_json for c in message.tool_calls)
    return estimate_tokens("".join(parts))
