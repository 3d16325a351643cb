from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from session_server.llm.sse import SSEDecoder, SSEEvent, iter_sse

STREAM = "\r\n".join(
    [
        ": keep-alive",
        "",
        "event: message_start",
        'data: {"a": "héllo ✓"}',
        "",
        "data: line one",
        "data:line two",
        "",
        "",
        "",
        "id: 7",
        "retry: 100",
        "data: [DONE]",
    ]
).encode()

EVENTS = [
    SSEEvent("message_start", '{"a": "héllo ✓"}'),
    SSEEvent("", "line one\nline two"),
    SSEEvent("", "[DONE]"),
]


async def pieces(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_events_comments_multiline_data_and_unterminated_tail() -> None:
    assert [e async for e in iter_sse(pieces(STREAM))] == EVENTS


# No deadline: hypothesis's default (200 ms per example) fails a run whose process is paused
# for that long (a loaded machine, a garbage collection), which says nothing about the decoder.
@settings(deadline=None, database=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8), st.sampled_from(["\r\n", "\n", "\r"]))
def test_the_same_events_wherever_the_stream_is_cut(cuts: list[int], line_end: str) -> None:
    """Pieces may end inside a line, between CR and LF, or inside a UTF-8 character."""
    stream = STREAM.replace(b"\r\n", line_end.encode())
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    decoder = SSEDecoder()
    events = [e for start, end in itertools.pairwise(bounds) for e in decoder.feed(stream[start:end])]
    assert events + decoder.finish() == EVENTS


def test_only_cr_and_lf_end_a_line() -> None:
    """JSON carries U+2028, U+2029 and U+0085 unescaped inside strings; they are text, not line ends."""
    data = '{"text": "a\u2028b\u2029c\u0085d\x0be"}'
    assert SSEDecoder().feed(f"data: {data}\n\n".encode()) == [SSEEvent("", data)]
