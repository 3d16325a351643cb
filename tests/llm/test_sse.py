from __future__ import annotations

from collections.abc import AsyncIterator

from session_server.llm.sse import SSEEvent, iter_sse


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_events_comments_multiline_data_and_unterminated_tail() -> None:
    events = [
        e
        async for e in iter_sse(
            lines(
                ": keep-alive",
                "",
                "event: message_start",
                'data: {"a": 1}',
                "",
                "data: line one",
                "data:line two",
                "",
                "",
                "",
                "id: 7",
                "retry: 100",
                "data: [DONE]",
            )
        )
    ]
    assert events == [
        SSEEvent("message_start", '{"a": 1}'),
        SSEEvent("", "line one\nline two"),
        SSEEvent("", "[DONE]"),
    ]
