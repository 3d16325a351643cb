"""Size limits on what clients and models send, each well below gRPC's message limit.

gRPC refuses any message over 64 MiB (`codelane.transport.MAX_MESSAGE_BYTES`). An event or a
history page over it could never be sent again: the session's stream, its replay and
`GetMessages` would fail for good. So every input that ends up in an event or in history is
bounded where it enters, with an error a person can act on, and events have a last safety net
(`bound_event`). Sizes are counted in characters: stored and sent as UTF-8, a character is at
most 4 bytes, which the limits allow for. Domain logic: no grpc.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from tool_worker.tools.base import cut, well_formed

# A client's message starting a turn.
MAX_PROMPT_CHARS = 1024 * 1024
# Why a client rejected a call (shown to the model, kept in the history and in events), and the
# name an external client claims tasks under (kept with each task it leases, and in events):
# unbounded, a 7 MB one was copied into each.
MAX_CONFIRMATION_REASON_CHARS = 16 * 1024
MAX_CLIENT_ID_CHARS = 256
# The arguments of one tool call, and of all the calls of one model response (they travel
# together in its ModelResponded event and its history message).
MAX_TOOL_ARGUMENTS_CHARS = 1024 * 1024
MAX_RESPONSE_ARGUMENTS_CHARS = 4 * 1024 * 1024
# Tool calls run per model response; the calls past it are answered with an error result.
MAX_TOOL_CALLS_PER_RESPONSE = 256
# A model response's text (a tool result's output: MAX_RESULT_OUTPUT_CHARS).
MAX_RESPONSE_TEXT_CHARS = 1024 * 1024
# The last safety net: an event bigger than this has its long strings cut.
MAX_EVENT_CHARS = 8 * 1024 * 1024
# Under that net, what each string of an oversized event keeps at most.
_CUT_STRING_CHARS = 64 * 1024
# What a call's arguments are recorded as when they were too big to keep (valid JSON: history
# goes back to the model, whose API wants an object).
OMITTED_ARGUMENTS = '{"omitted_by_codelane": "the arguments were too large to keep; see the call\'s result"}'

_T = TypeVar("_T")


def check_prompt(text: str) -> None:
    """Raises ValueError (an INVALID_ARGUMENT on `text`) for a prompt over MAX_PROMPT_CHARS."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"text is {len(text):,} characters: at most {MAX_PROMPT_CHARS:,} are accepted; send large inputs "
            "as files in the workspace and refer to them"
        )


def bound_event(payload: _T) -> _T:
    """The payload itself when it is small (the common case, checked without encoding it);
    otherwise a copy whose long strings are cut, so the event can always be sent."""
    if _size(payload, MAX_EVENT_CHARS) <= MAX_EVENT_CHARS:
        return payload
    return _shrink(payload)


def string_chars(value: Any) -> int:
    """Characters of the strings in `value` (dataclasses, lists, tuples and dicts): most of an
    event's size, counted without encoding it."""
    return _size(value, sys.maxsize)


_SCALARS = frozenset({int, float, bool, type(None)})


def _size(value: Any, budget: int) -> int:
    """Characters of the strings in `value`, counted until `budget` is passed. On the path of
    every event, so it looks at types directly rather than through `dataclasses`."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind in _SCALARS:
        return 0
    if kind is dict:
        items: Any = (*value, *value.values())
    elif kind is list or kind is tuple:
        items = value
    elif hasattr(value, "__dataclass_fields__"):
        items = _field_values(value).values()
    else:
        return 0
    total = 0
    for item in items:
        item_kind = type(item)
        if item_kind is str:
            total += len(item)
        elif item_kind not in _SCALARS:
            total += _size(item, budget - total)
        if total > budget:
            break
    return total


def well_formed_value(value: _T) -> _T:
    """A copy of `value` (an event, a stored message) whose strings are `well_formed`."""
    return _map_strings(value, well_formed)


def _shrink(value: Any) -> Any:
    return _map_strings(value, lambda text: cut(text, _CUT_STRING_CHARS, "event field"))


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to each of its strings (in dataclasses, lists, tuples and
    dicts); a dataclass field without strings is kept as it is."""
    kind = type(value)
    if kind is str:
        return change(value)
    if hasattr(value, "__dataclass_fields__"):
        fields = {name: _map_strings(item, change) for name, item in _field_values(value).items() if _size(item, 0)}
        return dataclasses.replace(value, **fields)
    if kind is list or kind is tuple:
        return kind(_map_strings(item, change) for item in value)
    if kind is dict:
        return {_map_strings(k, change): _map_strings(v, change) for k, v in value.items()}
    return value


def _field_values(value: Any) -> dict[str, Any]:
    """A dataclass's fields by name: its `__dict__` when it has one (fast), else by name (slots)."""
    values = getattr(value, "__dict__", None)
    if values is not None:
        return values
    return {name: getattr(value, name) for name in value.__dataclass_fields__}
