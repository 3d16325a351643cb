"""A damaged store file (a page overwritten, the file cut short, as a failing disk or a bad copy
leaves it): the server does not start on it, and says in one line which file and what to do,
rather than SQLite's words alone or "not a codelane store"."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.session.conftest import Processes, scripted

PAGE_SIZE = 4096


async def _stored_then_stopped(processes: Processes, workspace: Path, data_dir: Path, model: str) -> Path:
    """A store holding a session and its turn, checkpointed (a stopped server leaves no WAL)."""
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    await server.client.send(session.session_id, "go")
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.proc.wait, 30) == 0
    return data_dir / "codelane.db"


def _damage(store: Path, damage: str) -> None:
    assert not Path(f"{store}-wal").exists()  # all of it in the file itself
    if damage == "sessions_page":
        # The page the start reads first (it counts the sessions): the table's root.
        with sqlite3.connect(store) as db:
            [root] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sessions'").fetchone()
        db.close()
        with store.open("r+b") as f:
            f.seek((root - 1) * PAGE_SIZE)
            f.write(b"\xa5" * PAGE_SIZE)
    else:
        with store.open("r+b") as f:
            f.truncate(store.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["sessions_page", "cut_short"])
async def test_a_damaged_store_is_refused_in_one_line_naming_the_file(
    processes: Processes, workspace: Path, tmp_path: Path, damage: str
) -> None:
    data_dir = tmp_path / "data"
    model = scripted(tmp_path, [{"text": "Done."}, {"text": "Done."}])
    store = await _stored_then_stopped(processes, workspace, data_dir, model)
    _damage(store, damage)

    with pytest.raises(AssertionError) as refused:
        await processes.start_server(data_dir, model=model, local_workers=0)
    why = str(refused.value)
    assert "server exited with 1" in why
    assert f"codelane server: {store}: database disk image is malformed: its file is damaged" in why
    assert "restore it from a backup" in why
    assert "not a codelane store" not in why and "Traceback" not in why


async def test_an_emptied_store_whose_log_holds_data_is_refused_and_the_log_kept(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # SQLite, opening a 0-byte database, discards its write-ahead log: the server started as a
    # new store and every session was gone, without a word.
    data_dir = tmp_path / "data"
    model = scripted(tmp_path, [{"text": "Done."}])
    server = await processes.start_server(data_dir, model=model, local_workers=0)
    session = await server.client.create(workspace)
    await server.client.send(session.session_id, "go")
    server.proc.kill()  # leaves its WAL
    await asyncio.to_thread(server.proc.wait, 30)
    store, wal = data_dir / "codelane.db", data_dir / "codelane.db-wal"
    assert wal.stat().st_size > 0
    store.write_bytes(b"")  # a truncation, a failed copy
    logged = wal.read_bytes()

    with pytest.raises(AssertionError) as refused:
        await processes.start_server(data_dir, model=model, local_workers=0)
    why = str(refused.value)
    assert "server exited with 1" in why and "Traceback" not in why
    assert f"{store} is empty, but its write-ahead log {wal} holds" in why and "Restore the store from a backup" in why
    assert wal.read_bytes() == logged and store.stat().st_size == 0  # nothing discarded


async def test_a_store_path_sqlite_cannot_open_is_refused_naming_the_file(
    processes: Processes, tmp_path: Path
) -> None:
    # A directory where the store goes (or a dangling link): the server said only SQLite's
    # "unable to open database file", naming no file.
    data_dir = tmp_path / "data"
    (data_dir / "codelane.db").mkdir(parents=True)
    with pytest.raises(AssertionError) as refused:
        await processes.start_server(data_dir, local_workers=0)
    why = str(refused.value)
    assert "server exited with 1" in why and "Traceback" not in why
    store = data_dir / "codelane.db"
    assert f"codelane server: {store}: unable to open database file: its file cannot be opened" in why
