"""Server-sent events from a byte stream, as both providers send them (the WHATWG EventSource
format: UTF-8, lines ending in CRLF, LF or CR, fields `event` and `data`, a blank line ends an
event)."""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

# Only these end a line. `str.splitlines` also splits on U+2028, U+0085 and others, which JSON
# carries unescaped inside a string: a model's text holding one would cut its data line in two.
_LINE_END = re.compile("\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    event: str  # "" when the server sent no `event:` line
    data: str


class SSEDecoder:
    """Turns the pieces of a byte stream, cut anywhere (inside a line, a CRLF or a UTF-8
    character), into events. Comments (`: keep-alive`), `id` and `retry` are skipped."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial_line: list[str] = []
        self._event = ""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[SSEEvent]:
        text = self._text.decode(piece)
        if "\n" not in text and "\r" not in text:
            self._partial_line.append(text)
            return []
        text = "".join(self._partial_line) + text
        # A CR at the end may be the first half of a CRLF: it ends its line only with what follows.
        held_cr = text.endswith("\r")
        lines = _LINE_END.split(text[:-1] if held_cr else text)
        self._partial_line = [lines.pop(), "\r"] if held_cr else [lines.pop()]
        return self._read(lines)

    def finish(self) -> list[SSEEvent]:
        """What the end of the stream completes. An event still pending is delivered: some servers
        omit the final blank line."""
        text = "".join(self._partial_line) + self._text.decode(b"", final=True)
        self._partial_line = []
        events = self._read(_LINE_END.split(text))
        if self._data:
            events.append(SSEEvent(self._event, "\n".join(self._data)))
        self._event, self._data = "", []
        return events

    def _read(self, lines: list[str]) -> list[SSEEvent]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event, "\n".join(self._data)))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
        return events


async def iter_sse(pieces: AsyncIterable[bytes]) -> AsyncIterator[SSEEvent]:
    """The events of a byte stream, each as soon as its blank line arrived."""
    decoder = SSEDecoder()
    async for piece in pieces:
        for event in decoder.feed(piece):
            yield event
    for event in decoder.finish():
        yield event
