"""The event bus without a server: a subscriber's live buffer is bounded in events and in bytes;
one that passes either bound drops what it holds and reads on from the store, missing nothing. A
stopping server ends every subscription, after what it holds, with ShuttingDown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from session_server.admission import ShuttingDown
from session_server.bus import EVENT_OVERHEAD_BYTES, EventBus, estimated_size
from session_server.events import StoredEvent, TextDelta, ToolCallFinished
from session_server.store import MAX_READ_PAGE_CHARS, EventPage, SessionRecord, Store
from tool_worker.tools.base import ToolResult

KIB = 1024
BOUND = 5.0  # bound on every wait: a hang fails instead of blocking


class _Log:
    """A store whose events are stored before they are published, and the pages read from it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pages: list[EventPage] = []

    async def replay(self, session_id: str, after: int) -> EventPage:
        page = await self.store.read(lambda reads: reads.event_page(session_id, after))
        self.pages.append(page)
        return page

    def publish(self, bus: EventBus, event: StoredEvent) -> None:
        self.store.append_events([event])
        bus.publish_many([event])


@pytest.fixture
def log(tmp_path: Path) -> Iterator[_Log]:
    store = Store(tmp_path / "codelane.db")
    store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
    yield _Log(store)
    store.close()


def _read_result(sequence: int, output_chars: int) -> StoredEvent:
    result = ToolResult(output="x" * output_chars)
    return StoredEvent("s1", sequence, 1.0, "t1", ToolCallFinished(f"c{sequence}", "read", result, 0.0, 0.0))


async def _read(batches: AsyncIterator[list[StoredEvent]], count: int) -> list[int]:
    """Sequences of the next `count` events a subscriber is handed (its batches are ready: a
    subscriber with none would wait for good)."""
    sequences: list[int] = []
    while len(sequences) < count:
        sequences += [event.sequence for event in await asyncio.wait_for(anext(batches), BOUND)]
    return sequences


def test_an_events_size_is_its_strings_and_a_fixed_overhead() -> None:
    event = _read_result(1, 200 * KIB)
    assert 200 * KIB + EVENT_OVERHEAD_BYTES <= estimated_size(event) < 200 * KIB + 2 * EVENT_OVERHEAD_BYTES
    assert estimated_size(StoredEvent("s1", 2, 1.0, "t1", TextDelta("hi", 0))) == EVENT_OVERHEAD_BYTES + 2


async def test_a_subscriber_that_does_not_read_holds_at_most_its_bytes_and_misses_nothing(log: _Log) -> None:
    # 40 big tool results: the 10,000-event bound is far away, the byte bound is passed at the 6th.
    bus = EventBus(log.replay, buffer_bytes=1024 * KIB)
    stalled = bus.subscribe("s1", 0)
    for sequence in range(1, 41):
        log.publish(bus, _read_result(sequence, 200 * KIB))
        assert stalled.queued_bytes <= 1024 * KIB
    assert await _read(stalled.batches(), 40) == list(range(1, 41))  # from the store, each once, in order
    assert stalled.catch_ups == 1
    # 8 MB caught up in pages the store cut by size: short pages, and not the end of the log.
    assert len(log.pages) >= 2 and all(page.chars <= MAX_READ_PAGE_CHARS for page in log.pages)


async def test_a_subscriber_that_reads_keeps_its_events_live(log: _Log) -> None:
    bus = EventBus(log.replay, buffer_bytes=1024 * KIB)
    reader = bus.subscribe("s1", 0)
    batches = reader.batches()
    for sequence in range(1, 41):
        log.publish(bus, _read_result(sequence, 200 * KIB))
        assert await _read(batches, 1) == [sequence]
    assert reader.catch_ups == 0 and reader.queued_bytes == 0


async def test_a_stopping_server_ends_each_subscription_after_what_it_holds(log: _Log) -> None:
    bus = EventBus(log.replay, buffer_bytes=1024 * KIB)
    holding, behind = bus.subscribe("s1", 0), bus.subscribe("s1", 0)
    holding_batches = holding.batches()
    for sequence in range(1, 7):
        log.publish(bus, _read_result(sequence, 200 * KIB))  # `behind` reads none: past the bound at the 6th
        if sequence < 6:
            assert await _read(holding_batches, 1) == [sequence]
    assert behind.queued_bytes == 0 and holding.queued_bytes > 0
    bus.stop()
    assert bus.subscribers() == 0
    assert await _read(holding_batches, 1) == [6]  # what it held, then the end
    # The one behind does not read the store on: its reader resumes after the last event it got.
    for batches in (holding_batches, behind.batches(), bus.subscribe("s1", 6).batches()):
        with pytest.raises(ShuttingDown, match="resume with WatchEvents after_sequence"):
            await asyncio.wait_for(anext(batches), BOUND)
    assert behind.cursor == 0


async def test_a_turns_own_subscription_reads_the_store_to_the_end_before_it_ends(log: _Log) -> None:
    # A stopping server ends its turns (their TurnFinished stored) before it ends the streams: a
    # SendMessage stream that had fallen behind must still reach its TurnFinished.
    bus = EventBus(log.replay, buffer_bytes=1024 * KIB)
    turns_own = bus.subscribe("s1", 0, reads_to_the_end=True)
    for sequence in range(1, 9):
        log.publish(bus, _read_result(sequence, 200 * KIB))  # unread: behind from the 6th
    assert turns_own.queued_bytes == 0
    bus.stop()
    batches = turns_own.batches()
    assert await _read(batches, 8) == list(range(1, 9))
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(anext(batches), BOUND)
