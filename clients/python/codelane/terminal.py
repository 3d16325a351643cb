"""Text from a session made safe to print on a terminal.

What a session's events carry comes from a model and from the files it reads: a model's text, a
tool's output, a file written by an edit. A terminal obeys the escape sequences in what it is
given (set its title, move the cursor, rewrite what was printed, and on some terminals more), so
the renderers show every control character but line breaks and tabs as text (`\\x1b`) instead.
JSON output is left exact: it escapes them itself.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

# C0 controls but tab and line feed, DEL, C1 controls (an 8-bit CSI is \x9b), and the carriage
# return not before a line feed (it would let a line overwrite what came before it).
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
T = TypeVar("T")


def safe_text(text: str) -> str:
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(_shown, text.replace("\r\n", "\n"))


def _shown(match: re.Match[str]) -> str:
    return repr(match[0])[1:-1]


def for_terminal(value: T) -> T:
    """`value` (an event, or anything in one) with every string in it made safe to print."""
    return _safe(value)


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _safe(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        return tuple(_safe(item) for item in value)
    if isinstance(value, list):
        return [_safe(item) for item in value]
    if isinstance(value, dict):
        return {_safe(key): _safe(item) for key, item in value.items()}
    return value
