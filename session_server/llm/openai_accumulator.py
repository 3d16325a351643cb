"""Accumulating an OpenAI-compatible chat-completion stream into text and tool calls.

Pure (no I/O) and tolerant of the quirks of OpenAI-compatible servers listed in LLM_WIRE.md:

- calls are keyed by `index`, or by their position in the delta's list when `index` is missing;
- at a key whose call already has complete JSON-object arguments, a delta opens a new call when
  it brings a new non-empty id, or more non-whitespace arguments (Ollama reuses index 0 for
  several whole calls, sometimes without ids: appending would only make invalid JSON). A new id
  while the arguments are still incomplete continues the call (LM Studio sends one per chunk);
- the first non-empty `name` wins (LM Studio sends `""`, vLLM repeats it); `id` may also come
  inside `function` (old llama.cpp);
- string arguments are concatenated, object arguments `json.dumps`ed, no arguments mean `"{}"`;
- ids are generated when none come;
- whether there are tool calls is decided from what accumulated, not from `finish_reason`; but
  `finish_reason: "length"` (the output token limit) or `"content_filter"` says the last call
  may be cut off: unless its arguments are a complete JSON object, it is marked `cut_off` and
  never runs (a call cut right after its name would otherwise run with `{}`), and the stop reason
  stays `max_tokens` (`content_filter`).

A call is reported ready (`ToolCallReady`) as soon as a later call opens, if it and every
earlier call have a name and complete arguments: with complete JSON-object arguments nothing
later can extend it (see the rule above). The rest are reported at the end, in order.

A stream that ends with neither `[DONE]` nor a `finish_reason` was cut off. It is still accepted
when it produced tool calls that are all complete (they can run, and the model sees their
results); otherwise it is an error, since the text or arguments may be missing a tail.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
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

# Finish reasons of a response cut off wherever it was, and the stop reasons they become.
_STOP_REASONS = {"length": "max_tokens", "content_filter": "content_filter"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Arguments:
    """Argument text as it streams, with a linear-time answer to "is it a complete JSON object
    yet?": brace depth is tracked outside strings, and the text is parsed only once it closes.
    (Re-parsing on every fragment would be quadratic in a long `write` call.)"""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._depth = 0
        self._in_string = self._escaped = False
        self._closed = False  # the outermost object closed
        self._malformed = False  # something other than whitespace outside the object
        self._valid: bool | None = None  # json.loads verdict once closed

    def append(self, text: str) -> None:
        self._parts.append(text)
        for char in text:
            if self._depth == 0:
                if char == "{" and not self._closed:
                    self._depth = 1
                elif not char.isspace():
                    self._malformed = True
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}":
                self._depth -= 1
                self._closed = self._depth == 0

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def is_complete_object(self) -> bool:
        if not self._closed or self._malformed:
            return False
        if self._valid is None:
            try:
                self._valid = isinstance(json.loads(self.text), dict)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                self._valid = False
        return self._valid


@dataclass
class _Call:
    call_id: str = ""
    name: str = ""
    arguments: _Arguments = field(default_factory=_Arguments)
    ready: ModelToolCall | None = None  # set once reported, then never changes
    cut_off: bool = False

    def is_complete(self) -> bool:
        return self.arguments.is_complete_object()


class OpenAIAccumulator:
    """Feed it each parsed chunk, then call `finish`."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._text: list[str] = []
        self._calls: list[_Call] = []
        self._by_key: dict[int, _Call] = {}
        self._reported = 0
        self._finish_reason: str | None = None
        self._usage = Usage()

    def feed(self, chunk: Mapping[str, Any]) -> list[TextChunk | ToolCallReady]:
        """Take one chunk; return the text and newly ready calls it produced."""
        if chunk.get("error") or chunk.get("object") == "error":
            raise model_error("OpenAI", parse_error_payload(chunk), status=None)
        if isinstance(chunk.get("usage"), Mapping):
            self._usage = _usage(chunk["usage"])
        items: list[TextChunk | ToolCallReady] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text.append(content)
                items.append(TextChunk(content))
            for position, entry in enumerate(delta.get("tool_calls") or []):
                if self._add(position, entry):
                    items.extend(self._report_ready())
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return items

    def finish(self, done: bool) -> tuple[list[ToolCallReady], ModelResponse]:
        """End of stream (`done`: `[DONE]` was seen): the calls not yet reported, and the response."""
        calls = [c for c in self._calls if c.name or c.arguments.text.strip()]
        if not done and self._finish_reason is None and not (calls and all(c.is_complete() for c in calls)):
            raise ModelError(
                "STREAM_ERROR",
                "OpenAI stream ended early (no finish_reason, no [DONE]) with an incomplete "
                "response; try again",
            )
        if self._finish_reason in _STOP_REASONS and calls and not calls[-1].is_complete():
            # Reported ready only when complete, so not frozen yet.
            calls[-1].cut_off = True
        tail = [
            ToolCallReady(index, self._freeze(call)) for index, call in enumerate(calls) if not call.ready
        ]
        tool_calls = [self._freeze(call) for call in calls]
        # Decided by what accumulated: some servers end tool calls with finish_reason "stop".
        stop_reason = _STOP_REASONS.get(self._finish_reason or "") or ("tool_use" if tool_calls else "end_turn")
        return tail, ModelResponse("".join(self._text), tool_calls, self._usage, stop_reason)

    def _add(self, position: int, entry: Mapping[str, Any]) -> bool:
        """Merge one tool-call delta; True when it opened a new call."""
        function = entry.get("function") or {}
        key = entry.get("index")
        key = position if not isinstance(key, int) else key
        call_id = entry.get("id") or function.get("id") or ""
        arguments = function.get("arguments")
        if isinstance(arguments, Mapping):
            arguments = json.dumps(arguments)
        elif not isinstance(arguments, str):
            arguments = ""
        call = self._by_key.get(key)
        opened = call is None or (
            call.is_complete() and ((call_id and call_id != call.call_id) or bool(arguments.strip()))
        )
        if call is None or opened:
            call = self._by_key[key] = _Call()
            self._calls.append(call)
        if call_id and not call.call_id:
            call.call_id = call_id
        if function.get("name") and not call.name:
            call.name = function["name"]
        call.arguments.append(arguments)
        return opened

    def _report_ready(self) -> list[ToolCallReady]:
        """Report, in order, the calls before the newest one that are finished."""
        ready = []
        for call in self._calls[self._reported : -1]:
            if not (call.name and call.is_complete()):
                break
            ready.append(ToolCallReady(self._reported, self._freeze(call)))
            self._reported += 1
        return ready

    def _freeze(self, call: _Call) -> ModelToolCall:
        if call.ready is None:
            call.ready = ModelToolCall(
                call.call_id or self._new_id(), call.name, call.arguments.text.strip() or "{}", call.cut_off
            )
        return call.ready


def _usage(usage: Mapping[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        input_tokens=token_count(usage.get("prompt_tokens")),
        output_tokens=token_count(usage.get("completion_tokens")),
        cached_input_tokens=token_count(details.get("cached_tokens") if isinstance(details, Mapping) else 0),
    )
