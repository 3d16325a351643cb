"""Accumulating an Anthropic Messages stream into text and tool calls. Pure (no I/O).

A tool call is ready at its `content_block_stop` when its arguments are a complete JSON object;
otherwise at the end, once the stop reason is known: the output token limit (`max_tokens`, or
another of `_CUT_OFF`) may have cut the last block, right after its name even (a call that would
run with `{}`), and the API stops that block all the same. Such a call is marked `cut_off`, and
never runs. Unknown event and block types are ignored, as the API asks. A stream that ends
without `message_stop` was cut off; like the OpenAI stream it is accepted only when it produced
tool calls and every started tool_use block was stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from session_server.llm.base import (
    ModelError,
    ModelResponse,
    ModelToolCall,
    TextChunk,
    ToolCallReady,
    Usage,
    token_count,
)
from session_server.llm.http_errors import model_error, parse_error_payload

# Stop reasons of a response cut off wherever it was: by a token limit, its output's (max_tokens)
# or the context window's (newer models), or by the provider's safety classifier (refusal).
_CUT_OFF = ("max_tokens", "model_context_window_exceeded", "refusal")


@dataclass
class _ToolBlock:
    index: int
    call_id: str
    name: str
    initial_input: Any
    parts: list[str] = field(default_factory=list)

    def call(self) -> ModelToolCall:
        arguments = "".join(self.parts).strip()
        if not arguments:
            arguments = json.dumps(self.initial_input) if self.initial_input else "{}"
        return ModelToolCall(self.call_id, self.name, arguments)

    def complete(self) -> bool:
        """Whether the streamed arguments are a whole JSON object (none came: not known)."""
        arguments = "".join(self.parts).strip()
        if not arguments:
            return bool(self.initial_input)
        try:
            return isinstance(json.loads(arguments), dict)
        except (ValueError, RecursionError):
            return False


class AnthropicAccumulator:
    """Feed it each event's parsed data, then call `finish`."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._open: dict[int, _ToolBlock] = {}
        self._calls: list[ModelToolCall] = []
        # Positions of the calls not reported ready yet, and the stopped block of the last call.
        self._unreported: list[int] = []
        self._last_stopped: _ToolBlock | None = None
        self._last_block = -1  # index of the last content block started
        self._stop_reason: str | None = None
        self._stopped = False
        self._input = self._cache_read = self._cache_creation = self._output = 0

    def feed(self, event: str, data: Mapping[str, Any]) -> list[TextChunk | ToolCallReady]:
        """Take one event; return the text and the ready call it produced, if any."""
        kind = data.get("type") or event
        if kind == "error":
            raise model_error("Anthropic", parse_error_payload(data), status=None)
        if kind == "message_start":
            self._take_usage((data.get("message") or {}).get("usage") or {})
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            self._last_block = data.get("index", 0)
            if block.get("type") == "tool_use":
                self._open[self._last_block] = _ToolBlock(
                    self._last_block, block.get("id", ""), block.get("name", ""), block.get("input")
                )
        elif kind == "content_block_delta":
            return self._delta(data.get("index", 0), data.get("delta") or {})
        elif kind == "content_block_stop":
            block = self._open.pop(data.get("index", 0), None)
            if block is not None:
                self._calls.append(block.call())
                self._last_stopped = block
                if block.complete():
                    return [ToolCallReady(len(self._calls) - 1, self._calls[-1])]
                self._unreported.append(len(self._calls) - 1)
        elif kind == "message_delta":
            self._stop_reason = (data.get("delta") or {}).get("stop_reason") or self._stop_reason
            self._take_usage(data.get("usage") or {})
        elif kind == "message_stop":
            self._stopped = True
        return []

    def finish(self) -> tuple[list[ToolCallReady], ModelResponse]:
        """End of stream: tool blocks never stopped (a server bug) and the response."""
        # Cut after its message_delta (the stop reason, once every block is done), a response is
        # whole but for message_stop; so is one whose tool calls all stopped.
        if not self._stopped and (self._open or not (self._calls or self._stop_reason)):
            raise ModelError(
                "STREAM_ERROR",
                "Anthropic stream ended early (no message_stop) with an incomplete response; try again",
            )
        for index in sorted(self._open):
            self._last_stopped = self._open.pop(index)
            self._calls.append(self._last_stopped.call())
            self._unreported.append(len(self._calls) - 1)
        last = self._last_stopped
        if (self._stop_reason in _CUT_OFF and last is not None and last.index == self._last_block
                and not last.complete()):
            self._calls[-1] = dataclasses.replace(self._calls[-1], cut_off=True)
        tail = [ToolCallReady(position, self._calls[position]) for position in self._unreported]
        self._unreported = []
        return tail, ModelResponse(
            text="".join(self._text),
            tool_calls=list(self._calls),
            usage=Usage(
                input_tokens=self._input + self._cache_read + self._cache_creation,
                output_tokens=self._output,
                cached_input_tokens=self._cache_read,
            ),
            stop_reason=self._stop_reason or ("tool_use" if self._calls else "end_turn"),
        )

    def _delta(self, index: int, delta: Mapping[str, Any]) -> list[TextChunk | ToolCallReady]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            self._text.append(delta["text"])
            return [TextChunk(delta["text"])]
        if delta.get("type") == "input_json_delta" and index in self._open:
            self._open[index].parts.append(delta.get("partial_json") or "")
        return []

    def _take_usage(self, usage: Mapping[str, Any]) -> None:
        # message_delta repeats the counts cumulatively; a missing or null field keeps its value.
        self._input = token_count(usage.get("input_tokens")) or self._input
        self._cache_read = token_count(usage.get("cache_read_input_tokens")) or self._cache_read
        self._cache_creation = token_count(usage.get("cache_creation_input_tokens")) or self._cache_creation
        self._output = token_count(usage.get("output_tokens")) or self._output
