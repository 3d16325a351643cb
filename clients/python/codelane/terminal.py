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

# C0 controls but tab (line feed too, or not), DEL, C1 controls (an 8-bit CSI is \x9b), the
# Unicode line and paragraph separators, and a carriage return not before a line feed (it would
# let a line overwrite what came before it).
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_LINE_FEED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
T = TypeVar("T")


def escape_controls(text: str, *, keep_line_breaks: bool) -> str:
    """`text` with its control characters shown as Python escapes (`\\x1b`, `\\n`): all but tab,
    and line feeds too unless `keep_line_breaks` (a CRLF then reads as one line break). Also what
    the server's and worker's text logs do to a message (one line each)."""
    unsafe = _CONTROLS_BUT_LINE_FEED if keep_line_breaks else _CONTROLS
    if not unsafe.search(text):
        return text
    if keep_line_breaks:
        text = text.replace("\r\n", "\n")
    return unsafe.sub(_shown, text)


def safe_text(text: str) -> str:
    """`text` safe to print on a terminal, its line breaks kept."""
    return escape_controls(text, keep_line_breaks=True)


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
