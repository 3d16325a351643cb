"""What the mock writes: server-sent-event frames, each tagged with the tokens it carries (for
pacing) and whether it belongs to the stream's ending (which `cut_stream` drops)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from session_server.llm.script import estimate_tokens

# Arguments stream in fragments this long, like the few-token deltas of the real APIs.
ARGUMENT_FRAGMENT = 8


@dataclass(frozen=True)
class Frame:
    data: bytes
    tokens: int = 0
    final: bool = False


def data_frame(payload: Any, tokens: int = 0, final: bool = False) -> Frame:
    """An OpenAI-style frame: `data:` only."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return Frame(f"data: {text}\n\n".encode(), tokens, final)


def event_frame(payload: dict[str, Any], tokens: int = 0, final: bool = False) -> Frame:
    """An Anthropic-style frame: `event:` naming the payload's type, then `data:`."""
    return Frame(f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode(), tokens, final)


def fragments(text: str, size: int = ARGUMENT_FRAGMENT) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def token_count(text: str) -> int:
    # Pacing needs at least one token per non-empty delta, or a token rate would not slow it.
    return max(1, estimate_tokens(text)) if text else 0


def usage_as_strings(frame: Frame) -> Frame:
    """The frame with every token count of its `usage` objects sent as a string ("12", not 12)."""
    head, sep, payload = frame.data.decode().rpartition("data: ")
    try:
        body = json.loads(payload)
    except ValueError:
        return frame
    if not _stringify_usage(body):
        return frame
    return Frame(f"{head}{sep}{json.dumps(body)}\n\n".encode(), frame.tokens, frame.final)


def _stringify_usage(value: Any) -> bool:
    changed = False
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "usage" and isinstance(item, dict):
                for name, count in item.items():
                    if isinstance(count, int) and not isinstance(count, bool):
                        item[name] = str(count)
                        changed = True
            changed = _stringify_usage(item) or changed
    elif isinstance(value, list):
        for item in value:
            changed = _stringify_usage(item) or changed
    return changed
