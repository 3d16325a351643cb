"""The converted-event cache the api layer shares between a session's subscribers: bounded by
count and by bytes."""

from __future__ import annotations

from session_server.api.convert import _RecentEvents
from session_server.events import StoredEvent, TextDelta


def _delta(sequence: int, size: int) -> StoredEvent:
    return StoredEvent("s_1", sequence, 0.0, "t_1", TextDelta("x" * size, 1))


def test_big_events_are_held_up_to_the_byte_bound_not_the_count() -> None:
    # 4,096 events of tool results near their limit held 480 MiB.
    recent = _RecentEvents(max_events=100, max_bytes=1_000_000)
    for sequence in range(1, 51):
        recent.converted(_delta(sequence, 100_000))
    assert recent.held_bytes <= 1_000_000
    assert 8 <= len(recent) <= 10  # the newest that fit


def test_a_held_event_is_the_same_message_and_small_ones_are_bounded_by_count() -> None:
    recent = _RecentEvents(max_events=3, max_bytes=1_000_000)
    first = recent.converted(_delta(1, 10))
    assert recent.converted(_delta(1, 10)) is first
    for sequence in range(2, 10):
        recent.converted(_delta(sequence, 10))
    assert len(recent) == 3
    assert recent.held_bytes == 3 * first[1]
