"""An in-process model that replays a Script: deterministic, no network, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from itertools import islice

from session_server.llm.base import (
    ChatMessage,
    ModelRequest,
    ModelResponse,
    StreamItem,
    TextChunk,
    ToolCallReady,
    Usage,
)
from session_server.llm.script import Script, estimate_tokens, split_words, tokens_in_characters

# Text is streamed in at most this many chunks: enough to exercise streaming consumers.
_MAX_TEXT_CHUNKS = 4


class ScriptedProvider:
    """Streams the scripted response for each request; `latency` seconds pass before the first item."""

    def __init__(self, script: Script, latency: float = 0.0) -> None:
        self.script = script
        self.latency = latency

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        tally = _tally(request.messages)
        response = self.script.response_at(tally.assistants)
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
            usage=Usage(input_tokens=_prompt_tokens(request, tally), output_tokens=estimate_tokens(output)),
            stop_reason="tool_use" if response.tool_calls else "end_turn",
        )

    async def aclose(self) -> None:
        return None


def _chunks(text: str, count: int) -> list[str]:
    words = split_words(text)
    size = max(1, -(-len(words) // count))
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def _prompt_tokens(request: ModelRequest, tally: _Tally) -> int:
    """estimate_tokens of the request's whole text, from the lengths of its parts."""
    tools = sum(len(json.dumps(dict(t.parameters))) + len(t.description) for t in request.tools)
    return tokens_in_characters(len(request.system) + tools + tally.characters)


class _Tally:
    """What this model counts over a history: its assistant messages (which response comes next)
    and its characters (the prompt's tokens), as far as `counted` messages, the last of them `last`."""

    __slots__ = ("assistants", "characters", "counted", "last")

    def __init__(self) -> None:
        self.counted = self.assistants = self.characters = 0
        self.last: ChatMessage | None = None


# A session's history is one list that only grows (session_server.history.History), passed to
# every model request: counting it whole at every step made this model's cost grow with the
# history, which a real model pays on its own side, not the server's. A list is known again by its
# id and by holding, where counting stopped, the very message counted there (the tally keeps that
# message alive, so no other object can take its id meanwhile); anything else is counted afresh.
_TALLIES: OrderedDict[int, _Tally] = OrderedDict()
_MAX_TALLIES = 1024


def _tally(messages: Sequence[ChatMessage]) -> _Tally:
    key = id(messages)
    tally = _TALLIES.get(key)
    if tally is None or tally.counted > len(messages) or (
        tally.counted and messages[tally.counted - 1] is not tally.last
    ):
        tally = _Tally()
    for message in islice(messages, tally.counted, None):
        tally.assistants += message.role == "assistant"
        tally.characters += len(message.text) + sum(len(c.name) + len(c.arguments_json) for c in message.tool_calls)
    tally.counted = len(messages)
    tally.last = messages[-1] if messages else None
    _TALLIES[key] = tally
    _TALLIES.move_to_end(key)
    if len(_TALLIES) > _MAX_TALLIES:
        _TALLIES.popitem(last=False)
    return tally
