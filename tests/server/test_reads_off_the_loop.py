"""The store's big reads run off the event loop: loading a history that is not in memory, and the
page of a subscriber catching up. The loop serves the others meanwhile; what the reads return, and
raise, is what the reads on the loop did; a closing store stops them and leaves no thread behind.

A read is held by a gate in its row conversion (`session_server.store`'s own functions), so that
it is under way wherever it runs: on the loop's thread, it holds the loop, and the other coroutine
of each test cannot answer before the gate gives up (BOUND) and the test fails.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import session_server.store as store_module
from session_server.events import StoredEvent, TextDelta
from session_server.history import Histories
from session_server.pool import WorkerPool
from session_server.sessions import CaughtUp, SessionManager
from session_server.stats import LaneStats
from session_server.store import Reads, SessionRecord, Store, StoredMessage
from tool_worker.registry import ToolRegistry

BOUND = 5.0  # bound on every wait: a hang (or a held loop) fails instead of blocking


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "codelane-store-reader"]


def _messages(count: int) -> list[StoredMessage]:
    return [StoredMessage(role="user", text=f"message {i}") for i in range(count)]


# -- the reader --------------------------------------------------------------------------------


async def test_a_store_closed_during_a_read_stops_it_and_leaves_no_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "codelane.db")
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def endless(reads: Reads) -> Any:
        loop.call_soon_threadsafe(started.set)
        # Runs in SQLite until it is stopped.
        return reads._db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n").fetchone()

    reading = store.read(endless)
    await asyncio.wait_for(started.wait(), BOUND)
    assert reader_threads()
    store.close()  # returns: the read stops at its next check
    assert not reader_threads()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await asyncio.wait_for(reading, BOUND)  # as a read of a closed connection fails
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await asyncio.wait_for(store.read(lambda reads: reads.get_messages("s1")), BOUND)


async def test_a_read_sees_what_was_committed_before_it_even_after_one_failed_half_way(tmp_path: Path) -> None:
    # A statement left open holds its read transaction: the thread's next reads would see the
    # store as it was then.
    store = Store(tmp_path / "codelane.db", reader_threads=1)
    try:
        store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
        store.append_messages("s1", _messages(3))

        def fails_after_the_first_row(reads: Reads) -> None:
            rows = reads._db.execute("SELECT idx FROM messages WHERE session_id = 's1' ORDER BY idx")
            next(rows)
            raise ValueError("a row that does not convert")

        with pytest.raises(ValueError):
            await asyncio.wait_for(store.read(fails_after_the_first_row), BOUND)
        store.append_messages("s1", _messages(1))
        assert len(await asyncio.wait_for(store.read(lambda reads: reads.get_messages("s1")), BOUND)) == 4
    finally:
        store.close()


# -- reads held, counted, failed ---------------------------------------------------------------


class Gate:
    """Holds the first read that passes it, on whatever thread it runs, until the test releases it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Set on the loop once a read is held, and once it went on.
        self.holding = asyncio.Event()
        self.passed = asyncio.Event()
        self._released = threading.Event()
        # Whether the test released the held read; False when the gate gave up, the read having
        # held the loop the test runs on.
        self.released_by_the_test: bool | None = None

    def hold(self) -> None:
        if self.released_by_the_test is not None:
            return  # the first read only
        self._loop.call_soon_threadsafe(self.holding.set)
        self.released_by_the_test = self._released.wait(BOUND)
        self._loop.call_soon_threadsafe(self.passed.set)

    def release(self) -> None:
        self._released.set()


def gate_conversions(monkeypatch: pytest.MonkeyPatch, name: str) -> Gate:
    """A gate on the store's conversion `name` (of a message row, of an event payload)."""
    gate = Gate()
    convert = getattr(store_module, name)

    def held(*args: Any) -> Any:
        gate.hold()
        return convert(*args)

    monkeypatch.setattr(store_module, name, held)
    return gate


async def handshake() -> None:
    """Another coroutine on the loop (another session's) answers this one: it cannot while a read
    holds the loop."""
    asked, answered = asyncio.Event(), asyncio.Event()

    async def other_session() -> None:
        await asyncio.wait_for(asked.wait(), BOUND)
        answered.set()

    task = asyncio.create_task(other_session())
    asked.set()
    await asyncio.wait_for(answered.wait(), BOUND)
    await task


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sessions whose messages are read, as they are."""
    reads: list[str] = []
    get_messages = Reads.get_messages

    def counted(self: Reads, session_id: str, *args: Any, **kwargs: Any) -> list[StoredMessage]:
        reads.append(session_id)
        return get_messages(self, session_id, *args, **kwargs)

    monkeypatch.setattr(Reads, "get_messages", counted)
    return reads


def _fail_reads(monkeypatch: pytest.MonkeyPatch, method: str, times: int) -> list[None]:
    """The next `times` reads by `method` fail as on a failing disk; the list holds the failures
    still to come."""
    failures: list[None] = [None] * times
    read = getattr(Reads, method)

    def failing(self: Reads, *args: Any, **kwargs: Any) -> Any:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("disk I/O error")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Reads, method, failing)
    return failures


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "codelane.db")
    store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
    yield store
    store.close()


# -- histories ---------------------------------------------------------------------------------


async def test_the_loop_serves_the_others_while_a_history_loads(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read on the loop, a history of a gigabyte stalled every session for about a second.
    store.append_messages("s1", _messages(3))
    histories = Histories(store)
    gate = gate_conversions(monkeypatch, "_message_from_row")

    async def load() -> Any:
        return await histories.get("s1")

    loading = asyncio.create_task(load())
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    await handshake()
    gate.release()
    await asyncio.wait_for(gate.passed.wait(), BOUND)
    assert gate.released_by_the_test, "the history was read on the loop's thread: the loop waited for it"
    history = await asyncio.wait_for(loading, BOUND)
    assert [m.text for m in history.messages] == ["message 0", "message 1", "message 2"]


async def test_loads_of_one_history_at_once_read_it_once_and_share_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two histories of one session would each miss what the other's turn appends.
    store.append_messages("s1", _messages(2))
    histories = Histories(store)
    gate = gate_conversions(monkeypatch, "_message_from_row")
    reads = _count_reads(monkeypatch)
    first = asyncio.create_task(histories.get("s1"))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    second = asyncio.create_task(histories.get("s1"))
    gate.release()
    one, other = await asyncio.wait_for(asyncio.gather(first, second), BOUND)
    assert one is other and len(one.messages) == 2
    assert reads == ["s1"] and len(histories) == 1
    assert await histories.get("s1") is one  # from memory, without a read
    assert reads == ["s1"]


async def test_a_waiter_that_gives_up_leaves_the_load_to_the_cache(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append_messages("s1", _messages(2))
    histories = Histories(store)
    gate = gate_conversions(monkeypatch, "_message_from_row")
    reads = _count_reads(monkeypatch)
    waiter = asyncio.create_task(histories.get("s1"))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    waiter.cancel()  # its client went away
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    history = await asyncio.wait_for(histories.get("s1"), BOUND)  # the same load's, or cached by it
    assert len(history.messages) == 2 and reads == ["s1"]
    assert await histories.get("s1") is history


async def test_a_history_forgotten_while_it_loads_is_not_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its session was deleted meanwhile: kept, it would be the history of a session made later
    # with the same id.
    store.append_messages("s1", _messages(2))
    histories = Histories(store)
    gate = gate_conversions(monkeypatch, "_message_from_row")
    loading = asyncio.create_task(histories.get("s1"))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    histories.forget("s1")
    gate.release()
    assert len((await asyncio.wait_for(loading, BOUND)).messages) == 2  # its caller still gets it
    assert len(histories) == 0


async def test_a_history_the_store_fails_to_read_raises_its_error_and_is_read_again_next_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on the loop: the sqlite3.Error reaches the caller (SendMessage ends UNAVAILABLE,
    # STORE_UNAVAILABLE), and the reader thread goes on.
    store.append_messages("s1", _messages(2))
    histories = Histories(store)
    failures = _fail_reads(monkeypatch, "get_messages", 1)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        await asyncio.wait_for(histories.get("s1"), BOUND)
    assert failures == [] and len(histories) == 0
    assert len((await asyncio.wait_for(histories.get("s1"), BOUND)).messages) == 2


# -- subscribers catching up -------------------------------------------------------------------


def _manager(store: Store, buffer: int) -> SessionManager:
    return SessionManager(store, WorkerPool(), ToolRegistry.builtin(), LaneStats(), subscriber_buffer=buffer)


def _publish(manager: SessionManager, count: int) -> None:
    for _ in range(count):
        manager.events.append("s1", "t1", TextDelta("x", 0))
    manager.events.flush()  # stored, then published


async def _sequences(batches: AsyncIterator[list[StoredEvent]], count: int) -> list[int]:
    sequences: list[int] = []
    while len(sequences) < count:
        sequences += [event.sequence for event in await asyncio.wait_for(anext(batches), BOUND)]
    return sequences


async def test_the_loop_serves_the_others_while_a_follower_catches_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hundreds of idle followers of one busy session, each reading its page on the loop, stalled
    # it for up to 2 s.
    manager = _manager(store, buffer=2)
    follower = manager.bus.subscribe("s1", 0)
    _publish(manager, 5)  # past its buffer: it reads them from the store
    gate = gate_conversions(monkeypatch, "payload_from_json")
    batches = follower.batches()
    catching_up = asyncio.create_task(_sequences(batches, 5))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    await handshake()
    gate.release()
    await asyncio.wait_for(gate.passed.wait(), BOUND)
    assert gate.released_by_the_test, "the page was read on the loop's thread: the loop waited for it"
    assert await asyncio.wait_for(catching_up, BOUND) == [1, 2, 3, 4, 5]
    assert follower.catch_ups == 1
    await batches.aclose()


@pytest.mark.parametrize("published", [2, 3], ids=["within-the-buffer", "past-it-again"])
async def test_events_published_while_a_page_is_read_arrive_once_and_in_order(
    store: Store, monkeypatch: pytest.MonkeyPatch, published: int
) -> None:
    # Queued while the read is under way (or, past the buffer again, read by the next catch-up):
    # none lost, none twice.
    manager = _manager(store, buffer=2)
    follower = manager.bus.subscribe("s1", 0)
    _publish(manager, 5)
    gate = gate_conversions(monkeypatch, "payload_from_json")
    batches = follower.batches()
    catching_up = asyncio.create_task(_sequences(batches, 5 + published))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    _publish(manager, published)
    gate.release()
    assert await asyncio.wait_for(catching_up, BOUND) == list(range(1, 6 + published))
    assert follower.catch_ups == (1 if published == 2 else 2)
    _publish(manager, 1)  # and it goes on live
    assert await _sequences(batches, 1) == [6 + published]
    await batches.aclose()


async def test_the_loop_serves_the_others_while_a_replay_reads_its_pages(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Clients resuming together after a restart each replayed their sessions on the loop.
    manager = _manager(store, buffer=2)
    _publish(manager, 5)
    gate = gate_conversions(monkeypatch, "payload_from_json")
    watch = manager.watch("s1", 0, follow=True)
    replaying = asyncio.create_task(anext(watch))
    await asyncio.wait_for(gate.holding.wait(), BOUND)
    await handshake()
    _publish(manager, 2)  # while the page is read: after the replay's pages, once each
    gate.release()
    await asyncio.wait_for(gate.passed.wait(), BOUND)
    assert gate.released_by_the_test, "the page was read on the loop's thread: the loop waited for it"
    items = [await replaying]
    while not isinstance(items[-1], CaughtUp):
        items.append(await asyncio.wait_for(anext(watch), BOUND))
    replayed = [event.sequence for batch in items[:-1] for event in batch]
    assert replayed == [1, 2, 3, 4, 5, 6, 7] and items[-1].last_sequence == 7
    _publish(manager, 1)  # then live
    assert [event.sequence for event in await asyncio.wait_for(anext(watch), BOUND)] == [8]
    await watch.aclose()


async def test_a_page_the_store_fails_to_read_ends_the_subscription_with_its_error(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = _manager(store, buffer=2)
    follower = manager.bus.subscribe("s1", 0)
    _publish(manager, 5)
    _fail_reads(monkeypatch, "event_page", 1)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        await _sequences(follower.batches(), 5)
    assert manager.bus.subscribers() == 0
    # The reader goes on: another follower catches up.
    other = manager.bus.subscribe("s1", 0)
    _publish(manager, 5)
    assert await _sequences(other.batches(), 10) == list(range(1, 11))
