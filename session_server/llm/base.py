"""What the agent loop needs from a model provider, as plain domain types (no grpc, no httpx).

A provider turns a `ModelRequest` into an async stream of `TextChunk` and `ToolCallReady`
items that ends with exactly one `ModelResponse` (the whole response, accumulated). Failures
are raised as `ModelError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from tool_worker.tools.base import ToolSpec, well_formed

T = TypeVar("T")


# What a response may hold unless the session says otherwise (SessionConfig.max_output_tokens).
DEFAULT_MAX_TOKENS = 8192


@dataclass(frozen=True)
class ModelToolCall:
    """One tool call as the model produced it. `arguments_json` may be invalid JSON: the loop
    turns that into an error result for the model, never a crash. `cut_off`: the response was cut
    off (its output token limit, a provider's filter) before the call's arguments were complete
    (they hold what came, "{}" when nothing did): the loop answers it with an error, never runs it."""

    call_id: str
    name: str
    arguments_json: str
    cut_off: bool = False


@dataclass
class ChatMessage:
    """One history message, provider-neutral.

    user: `text`. assistant: `text` and `tool_calls`. tool: `tool_call_id`, `text` (the result
    output) and `is_error`.
    """

    role: Literal["user", "assistant", "tool"]
    text: str = ""
    tool_calls: list[ModelToolCall] = field(default_factory=list)
    tool_call_id: str = ""
    is_error: bool = False


def token_count(value: object) -> int:
    """A token count as a server sent it: servers that send "12" for 12 exist; anything that is
    not a count is 0 (usage is for accounting, never worth failing a turn over)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return 0


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
        )


@dataclass(frozen=True)
class ModelRequest:
    model: str
    system: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec]
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class TextChunk:
    """A fragment of the model's text, as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCallReady:
    """A tool call whose arguments have finished streaming, before the response is complete.
    The loop may dispatch a leading Query call on it. `index` is its position in the response."""

    index: int
    call: ModelToolCall


@dataclass(frozen=True)
class ModelResponse:
    """The complete response: the last item of every stream."""

    text: str
    tool_calls: list[ModelToolCall]
    usage: Usage
    stop_reason: str


StreamItem = TextChunk | ToolCallReady | ModelResponse


def well_formed_item(item: StreamItem) -> StreamItem:
    """The item with its text `well_formed`: a model's JSON may hold lone surrogates ("\\ud800"),
    which the history, the events and the workers' Assigns (all UTF-8) cannot carry. The item
    itself when nothing changed (nearly always: `well_formed` returns its own argument then)."""
    if isinstance(item, TextChunk):
        text = well_formed(item.text)
        return item if text is item.text else TextChunk(text)
    if isinstance(item, ToolCallReady):
        call = _well_formed_call(item.call)
        return item if call is item.call else ToolCallReady(item.index, call)
    text, calls = well_formed(item.text), [_well_formed_call(call) for call in item.tool_calls]
    if text is item.text and all(new is old for new, old in zip(calls, item.tool_calls, strict=True)):
        return item
    return ModelResponse(text, calls, item.usage, item.stop_reason)


def _well_formed_call(call: ModelToolCall) -> ModelToolCall:
    fields = (well_formed(call.call_id), well_formed(call.name), well_formed(call.arguments_json))
    if fields == (call.call_id, call.name, call.arguments_json):
        return call
    return ModelToolCall(*fields, cut_off=call.cut_off)


class ModelError(Exception):
    """A model request failed for good (after the provider's own retries).

    `reason` is machine-readable (RATE_LIMITED, OVERLOADED, BAD_REQUEST, AUTHENTICATION,
    SERVER_ERROR, CONNECTION, STREAM_ERROR, ...); the message is for a person and never holds an
    API key.
    """

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


# Ends a provider's text cut short in an error message. The cut is made before the key is known
# (a mid-stream error's message is redacted by the transport): http_errors.redact() looks for
# the key's start before it.
CUT = "…"


def excerpt(text: str, limit: int = 200) -> str:
    """What a provider sent, quoted for an error message: at most `limit` characters, and CUT
    after a longer one (so that redaction finds a key the cut went through)."""
    return repr(text if len(text) <= limit else text[:limit] + CUT)


def fed_items(feed: Callable[..., Iterable[T]], raw: str, *args: object) -> list[T]:
    """An accumulator's items for one streamed chunk. A chunk of the wrong shape (servers that
    send `{"choices": ["x"]}` exist) is a ModelError saying so, never a crash of the turn."""
    try:
        return list(feed(*args))
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        raise ModelError(
            "STREAM_ERROR",
            f"the model server sent a chunk of the wrong shape ({type(exc).__name__}: {exc}): {excerpt(raw)}",
        ) from None


class ModelProvider(Protocol):
    """A model backend. Implementations must be safe to use from many sessions at once."""

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]: ...

    async def aclose(self) -> None: ...
