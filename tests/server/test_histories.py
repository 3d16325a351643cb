"""The histories kept in memory: bounded by count and by characters."""

from __future__ import annotations

from pathlib import Path

from session_server.history import Histories
from session_server.store import SessionRecord, Store, StoredMessage


def _store_with(tmp_path: Path, sizes: dict[str, int]) -> Store:
    store = Store(tmp_path / "codelane.db")
    for session_id, size in sizes.items():
        store.create_session(SessionRecord(session_id=session_id, workspace="/ws"))
        store.append_messages(session_id, [StoredMessage(role="user", text="x" * size)])
    return store


async def test_the_least_recent_histories_go_once_they_hold_too_many_characters(tmp_path: Path) -> None:
    # A count alone let eight sessions of large tool results hold 486 Mi characters.
    store = _store_with(tmp_path, {"a": 1000, "b": 1000, "c": 1000})
    histories = Histories(store, limit=10, max_chars=2500)
    a = await histories.get("a")
    await histories.get("b")
    await histories.get("c")
    assert len(histories) == 2  # "a" went: three held 3,000
    a.append([StoredMessage(role="user", text="y" * 10)])  # a turn's history lives on meanwhile
    assert (await histories.get("a")).chars == 1010  # read back from the store
    store.close()


async def test_the_history_a_turn_uses_stays_however_big(tmp_path: Path) -> None:
    store = _store_with(tmp_path, {"big": 5000, "small": 10})
    histories = Histories(store, limit=10, max_chars=1000)
    assert (await histories.get("big")).chars == 5000
    assert len(histories) == 1
    await histories.get("small")
    assert len(histories) == 1  # the big one went for the one in use
    store.close()
