"""The store's reader threads (`Store.read`): what their reads see and raise, and a closing store
stops them and leaves no thread behind."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from session_server.store import Reads, SessionRecord, Store, StoredMessage

BOUND = 5.0  # bound on every wait: a hang fails instead of blocking


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
