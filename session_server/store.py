"""Persistence of sessions, their history and their event log, in one SQLite file.

Threading rule: a `Store` belongs to the thread that opened it, in the server the event loop
thread, which calls its methods directly. sqlite3 enforces this (a call from another thread
raises `sqlite3.ProgrammingError`). Calls are not sent to an executor on purpose: in WAL mode
with synchronous=NORMAL a commit is a write to the WAL without an fsync, cheaper than a hop to a
worker thread and back. Checkpoints, which copy the WAL into the database and fsync both (7-11 ms
on the development VM), run in a thread of the store's own (`_Checkpointer`), shortly after
commits: left to SQLite, the commit that passed ~1000 WAL pages ran one on the event loop and
stalled every session of the server meanwhile. SQLite's own checkpoint stays as the backstop, for
a writer that never pauses long enough for the thread's checkpoint to reach the WAL's end.

Two reads too big for the loop go to reader threads of the store's own, each with a read-only
connection (`Store.read`): loading a history that is not in memory (about 1 s for one of 1 GB)
and the page of a subscriber catching up (hundreds of followers of one busy session, each
reading theirs, stalled the loop for up to 2 s). In WAL mode they and the writer do not wait for
each other. The other reads stay on the loop: most are small, and cost less there than the hop to
a thread and back (about 25 us against 100: `benchmarks/read_stall_bench.py`); the pages of a
WatchEvents replay and of GetMessages, bounded (`MAX_READ_PAGE_CHARS`), are read there too.

Events are written in batches (`append_events`, one transaction per batch: see
`session_server.eventlog`, which assigns their sequences and commits once per event-loop turn).
A session is marked running when its turn starts, and idle by the commit that stores the turn's
TurnFinished: never idle while its turn's events are not all stored, so a server that stops then
finds the turn running and ends it (`SessionManager.recover`).

Durability: a batch is committed before its events are sent to anyone, so an event a client saw
survives a crash of the server process. With synchronous=NORMAL the last commits may be lost on
a power failure or OS crash (SQLite fsyncs the WAL at checkpoints); that is the price of a fast
hot path, and the log stays consistent either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from session_server.events import (
    CallInfo,
    StoredEvent,
    TurnFinished,
    call_from_dict,
    payload_from_json,
    payload_to_json,
    result_from_dict,
    to_json,
)
from session_server.paging import decode_page_token, encode_page_token
from tool_worker.tools.base import ToolResult

SCHEMA_VERSION = 1
# ListSessions: a page_size of 0 means the default; the store cuts a larger one to the maximum
# (the session API refuses it first).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A ListSessions page stops before its sessions' configurations and labels reach this many
# characters (JSON): under the 4 MiB gRPC clients accept by default (see api/sessions.py).
MAX_PAGE_CHARS = 3 * 1024 * 1024
# Events read at a time (a subscriber catching up, a WatchEvents replay, recovery).
EVENT_PAGE_SIZE = 500
# A page of events or of history messages read from the store stops once what it holds passes
# this many characters (of stored JSON and text): a tool output may take a megabyte, so 500 events
# read whole held 500 MB per catching-up reader, and a few of them could exhaust the server's
# memory. A page holds at least one row, whatever its size, or a big event would stop a reader
# there for good.
MAX_READ_PAGE_CHARS = 4 * 1024 * 1024

# How long after a commit the checkpointer checkpoints: a turn's results are committed within a
# few milliseconds of each other, and waiting this long lets them share one checkpoint (one fsync)
# that is over before the turn's next step commits again.
CHECKPOINT_DELAY = 0.02

# Threads that run the reads too big for the event loop (`Store.read`), each with a connection of
# its own: two, so that a long one (a whole history of a gigabyte takes about a second) does not
# hold up the pages of followers catching up behind it. More would only share the GIL.
READER_THREADS = 2
# A read under way checks every this many SQLite VM steps whether its store is closing, and stops
# there (`_Reader.close`): a few hundred microseconds of work between checks.
READER_CLOSING_CHECK_STEPS = 10_000

log = logging.getLogger("codelane.store")

SessionState = Literal["idle", "running"]
Role = Literal["user", "assistant", "tool"]
T = TypeVar("T")
_STATES = ("idle", "running")
_ROLES = ("user", "assistant", "tool")

_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    config_json TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    last_sequence INTEGER NOT NULL,
    message_count INTEGER NOT NULL,
    current_turn_id TEXT NOT NULL
);
CREATE INDEX sessions_by_created ON sessions (created, session_id);
CREATE TABLE messages (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    tool_calls_json TEXT NOT NULL,
    tool_call_id TEXT NOT NULL,
    tool_result_json TEXT,
    turn_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE events (
    session_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    turn_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    PRIMARY KEY (session_id, sequence)
);
"""

_SESSION_COLUMNS = (
    "session_id, workspace, config_json, labels_json, state, created, updated, "
    "last_sequence, message_count, current_turn_id"
)
_MESSAGE_COLUMNS = "idx, role, text, tool_calls_json, tool_call_id, tool_result_json, turn_id, created"


@dataclass
class EventPage:
    """Events read in one go, in order."""

    events: list[StoredEvent]
    # True when the page stopped at its count or size bound with events left after it: read on
    # after its last sequence. False when it reached the end of the log (as it was when read). A
    # short page says nothing: a few big events fill one.
    more: bool
    # Characters of the events' stored payloads (JSON): roughly what the page holds in memory.
    chars: int


def check_writable(db: sqlite3.Connection) -> None:
    """Raises sqlite3.Error unless `db` can take writes now: takes the write lock, writes what is
    there (the schema version) and rolls back. SQLite opens a file it cannot write read-only,
    without a word, and takes the lock on it all the same: only a write says so (SQLITE_READONLY)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        db.execute("ROLLBACK")


class StoreError(Exception):
    """The store file cannot be used; the message says why and what to do."""


class StoreUnavailable(Exception):
    """The store cannot take writes now (a read-only file, a full disk, an I/O error, a lock held
    too long); the message says what failed and what to do. `error_name` is SQLite's name for the
    failure (`SQLITE_FULL`, `SQLITE_READONLY`, ...), "" when it was not SQLite's."""

    def __init__(self, message: str, error_name: str = "") -> None:
        super().__init__(message)
        self.error_name = error_name


# What a person can do about a failure, by SQLite's primary error name.
_REMEDIES = {
    "SQLITE_READONLY": "its file or directory is read-only to the server: the operator must make them writable",
    "SQLITE_FULL": "the disk of its data directory is full: the operator must free space on it",
    "SQLITE_IOERR": "its disk failed to read or write: the operator must check the disk of its data directory",
    "SQLITE_BUSY": "another process holds its write lock: the operator must stop that process",
    "SQLITE_LOCKED": "another process holds its write lock: the operator must stop that process",
    "SQLITE_CANTOPEN": "its file cannot be opened: the operator must check that the server can write its data "
                       "directory",
    "SQLITE_CORRUPT": "its file is damaged: the operator must restore it from a backup",
    "SQLITE_NOTADB": "its file is not a database: the operator must restore it from a backup",
}


def _refuse_emptied(path: Path) -> None:
    """An empty store file beside a write-ahead log that holds data was cut short (a truncation, a
    failed copy): SQLite, opening it, would discard the log, and every session in it, and the
    server would start as a new store without a word. Nothing is opened or changed."""
    wal = Path(f"{path}-wal")
    try:
        emptied = path.stat().st_size == 0 and wal.stat().st_size > 0
    except FileNotFoundError:
        return
    if emptied:
        raise StoreError(
            f"{path} is empty, but its write-ahead log {wal} holds {wal.stat().st_size:,} bytes: the store "
            "was cut short, and opening it would discard the log. Restore the store from a backup (the log "
            "is left as it is), or move both files away to start a new, empty store"
        )


def unusable_at_start(path: Path, failure: sqlite3.Error) -> StoreError:
    """The StoreError of a store file that failed the server's start (opened, or read by the
    recovery of its interrupted turns): the file, SQLite's words, and what the operator can do."""
    name = failure.sqlite_errorname or ""
    remedy = _REMEDIES.get("_".join(name.split("_")[:2]), "")
    return StoreError(f"{path}: {failure}: {remedy}" if remedy else f"{path}: {failure}")


def store_unavailable(failure: BaseException, context: str = "") -> StoreUnavailable:
    """The `StoreUnavailable` that `failure` (a sqlite3.Error, or what a commit raised) means for
    a caller, its message starting with `context` when given."""
    name = getattr(failure, "sqlite_errorname", "") or ""
    # An extended name (SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED) starts with its primary one.
    remedy = _REMEDIES.get("_".join(name.split("_")[:2]), "")
    cause = f"{failure}: {remedy}" if remedy else str(failure)
    message = f"the session server cannot use its store ({cause}); retry later, or on another server"
    return StoreUnavailable(f"{context}: {message}" if context else message, name)


class UnknownSession(LookupError):
    """No session has the given id."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session with id {session_id!r}")
        self.session_id = session_id


class SessionExists(ValueError):
    """A session with the given id is already stored."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"a session with id {session_id!r} already exists")
        self.session_id = session_id


@dataclass
class SessionRecord:
    """A session as stored. Times are epoch seconds."""

    session_id: str
    workspace: str
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    state: SessionState = "idle"
    created: float = 0.0
    updated: float = 0.0
    # Sequence of the session's last event; 0 before the first.
    last_sequence: int = 0
    message_count: int = 0
    # Turn running now, or the last one that ran; empty before the first.
    current_turn_id: str = ""


@dataclass(kw_only=True)
class StoredMessage:
    """One history message. `idx` (its position, from 0) and `created` are assigned by
    `Store.append_messages`; the values passed in are ignored."""

    idx: int = -1
    role: Role
    text: str = ""
    tool_calls: list[CallInfo] = field(default_factory=list)
    tool_call_id: str = ""
    tool_result: ToolResult | None = None
    turn_id: str = ""
    created: float = 0.0


class Reads:
    """The reads that may run in a reader thread (`Store.read`), on the connection they are given:
    a reader thread's own, or the `Store`'s on the event loop (it inherits them)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get_messages(self, session_id: str, offset: int = 0, limit: int | None = None,
                     max_chars: int | None = None) -> list[StoredMessage]:
        """Messages with idx >= offset, in history order, at most `limit` (None: all), stopping
        once their text and JSON pass `max_chars` (None: no bound; at least one message)."""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (session_id, offset, -1 if limit is None else limit),
        )
        # Row by row: a page of 1,000 tool results of a megabyte fetched whole held a gigabyte.
        messages: list[StoredMessage] = []
        chars = 0
        for row in rows:
            chars += len(row[2]) + len(row[3]) + len(row[5] or "")  # text, tool calls, tool result
            if max_chars is not None and messages and chars > max_chars:
                break
            messages.append(_message_from_row(row))
        rows.close()
        return messages

    def event_page(self, session_id: str, after_sequence: int = 0, limit: int = EVENT_PAGE_SIZE,
                   max_chars: int = MAX_READ_PAGE_CHARS) -> EventPage:
        """Events with sequence > after_sequence, in order: at most `limit`, and no more once
        their stored payloads pass `max_chars` (but at least one). `more` says whether to read on."""
        # One row more than the page tells whether another page follows.
        rows = self._db.execute(
            "SELECT sequence, time, turn_id, kind, payload_json FROM events "
            "WHERE session_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (session_id, after_sequence, limit + 1),
        )
        # Row by row (see MAX_READ_PAGE_CHARS): beyond the page, only the row that passes the bound
        # is read, and dropped at once.
        events: list[StoredEvent] = []
        chars = 0
        more = False
        for sequence, at, turn_id, kind, text in rows:
            if len(events) == limit or (events and chars + len(text) > max_chars):
                more = True
                break
            chars += len(text)
            events.append(StoredEvent(session_id, sequence, at, turn_id, payload_from_json(kind, text)))
        rows.close()
        return EventPage(events, more, chars)


class Store(Reads):
    """Sessions, messages and events in one SQLite file (see the module docstring for the
    threading rule and the durability guarantee)."""

    def __init__(self, path: Path, checkpoint_delay: float | None = CHECKPOINT_DELAY,
                 reader_threads: int = READER_THREADS) -> None:
        """`checkpoint_delay` None leaves checkpoints to SQLite, in the commits (the benchmark's
        comparison)."""
        _refuse_emptied(path)
        # Autocommit mode: transactions are opened explicitly by `_transaction`, so each one is
        # visible in the code and nothing is left open between calls.
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:  # a directory or a dangling link there: it said only SQLite's words
            raise unusable_at_start(path, exc) from exc
        self.checkpointer = None if checkpoint_delay is None else _Checkpointer(path, checkpoint_delay)
        self._reader = _Reader(path, reader_threads)
        try:
            self._open(path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> None:
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if (exc.sqlite_errorname or "").startswith("SQLITE_CORRUPT"):
                # A store cut short (a truncated copy, a failed disk): it is ours, and holds sessions.
                raise unusable_at_start(path, exc) from exc
            raise StoreError(f"{path} is not a codelane store ({exc}); point the server at another file") from exc
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} was written by a newer codelane (store schema v{version}; this server reads "
                f"up to v{SCHEMA_VERSION}): upgrade codelane, or point the server at another file"
            )
        try:
            check_writable(self._db)
        except sqlite3.OperationalError as exc:
            # A connection SQLite opened read-only stays so, whatever is fixed later: refused now,
            # in one line, rather than serving until the first write fails.
            if (exc.sqlite_errorname or "").startswith("SQLITE_READONLY"):
                raise StoreError(
                    f"{path} cannot take writes ({exc}): make it, its -wal and -shm files and its directory "
                    "writable by the server's user, or point the server at another file"
                ) from exc
            # Anything else (another process holding the lock a while) is the readiness probe's
            # to report: the server starts NOT_SERVING, and serves once it clears.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if version == 0:
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: the write lock is taken up front, so another connection holding it (the
        # readiness probe's, for a moment) is waited for under the busy timeout. A deferred
        # transaction that has read and then writes gets "database is locked" at once in WAL
        # mode, without waiting.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if self.checkpointer is not None:
            self.checkpointer.written()

    def close(self) -> None:
        """Closes the store; a `read` under way stops (see `_Reader.close`), one asked from now on
        fails as a closed connection does, with sqlite3.ProgrammingError."""
        # The other threads' connections first: the last connection to close checkpoints what is
        # left and removes the WAL.
        self._reader.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self._db.close()

    def read(self, query: Callable[[Reads], T]) -> asyncio.Future[T]:
        """What `query` returns, run in a reader thread on a read-only connection of its own: for
        the reads that would stall the event loop, and every session with it (a history of a
        gigabyte takes about a second to read). The thread's work, converting rows included,
        shares the GIL with the loop, which is handed it at least every `sys.getswitchinterval()`.

        The read sees whatever was committed before it was asked for: in WAL mode each read
        begins a read transaction of its own, on the last commit. What it raises, a sqlite3.Error
        included, the await raises; the thread goes on with the next read. `query` returns what
        it read, never a cursor (it would read on in a thread that is not its connection's)."""
        return asyncio.wrap_future(self._reader.submit(query))

    # Sessions

    def create_session(self, record: SessionRecord) -> None:
        """Store a new session. Raises `SessionExists` if the id is taken."""
        if record.state not in _STATES:
            raise ValueError(f"session state must be one of {_STATES}, not {record.state!r}")
        try:
            with self._transaction() as db:
                db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.session_id,
                        record.workspace,
                        json.dumps(record.config),
                        json.dumps(record.labels),
                        record.state,
                        record.created,
                        record.updated,
                        record.last_sequence,
                        record.message_count,
                        record.current_turn_id,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise SessionExists(record.session_id) from exc

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return _session_from_row(row) if row else None

    def list_sessions(self, page_size: int = 0, page_token: str = "") -> tuple[list[SessionRecord], str]:
        """One page of sessions, newest first, and the token of the next page ("" on the last).

        `page_size` 0 means DEFAULT_PAGE_SIZE; more than MAX_PAGE_SIZE is cut to it. Raises
        ValueError for a negative size or a token this method did not return.
        """
        if page_size < 0:
            raise ValueError(f"page_size must not be negative, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # One row more than the page tells whether another page follows.
        if page_token:
            created, session_id = decode_page_token(page_token, "ListSessions", float, str)
            rows = self._db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE (created, session_id) < (?, ?) "
                "ORDER BY created DESC, session_id DESC LIMIT ?",
                (created, session_id, size + 1),
            )
        else:
            rows = self._db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY created DESC, session_id DESC LIMIT ?",
                (size + 1,),
            )
        # Read row by row, up to the page's size: a page of 1,000 bulky sessions fetched whole
        # would hold a gigabyte before it was cut.
        sessions: list[SessionRecord] = []
        chars = 0
        more = False
        for row in rows:
            chars += len(row[2]) + len(row[3])  # config_json, labels_json: the bulk of a session
            if len(sessions) == size or (sessions and chars > MAX_PAGE_CHARS):
                more = True
                break
            sessions.append(_session_from_row(row))
        rows.close()
        next_token = encode_page_token(sessions[-1].created, sessions[-1].session_id) if more else ""
        return sessions, next_token

    def count_sessions(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def delete_session(self, session_id: str) -> bool:
        """Delete a session with its messages and events. False if there was no such session."""
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
        return deleted > 0

    def set_session_state(self, session_id: str, state: SessionState, turn_id: str) -> None:
        """Record that a turn started ("running") or ended ("idle"); `turn_id` becomes the
        session's current turn."""
        if state not in _STATES:
            raise ValueError(f"session state must be one of {_STATES}, not {state!r}")
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE sessions SET state = ?, current_turn_id = ?, updated = ? WHERE session_id = ?",
                (state, turn_id, time.time(), session_id),
            ).rowcount
        if not changed:
            raise UnknownSession(session_id)

    def interrupted_turns(self) -> list[tuple[str, str]]:
        """(session_id, turn_id) of every session still marked running. Called at start-up,
        when no turn can be running, so these are turns a stopped server left unfinished."""
        return self._db.execute(
            "SELECT session_id, current_turn_id FROM sessions WHERE state = 'running' ORDER BY created, session_id"
        ).fetchall()

    # Messages

    def append_messages(self, session_id: str, messages: list[StoredMessage]) -> list[StoredMessage]:
        """Append messages to the session's history, in order and atomically. Returns them
        with `idx` (continuing from the session's message count) and `created` filled in."""
        for message in messages:
            if message.role not in _ROLES:
                raise ValueError(f"message role must be one of {_ROLES}, not {message.role!r}")
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT message_count FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            if row is None:
                raise UnknownSession(session_id)
            stored = [
                dataclasses.replace(message, idx=row[0] + offset, created=now)
                for offset, message in enumerate(messages)
            ]
            db.executemany(
                f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_message_row(session_id, message) for message in stored],
            )
            db.execute(
                "UPDATE sessions SET message_count = ?, updated = ? WHERE session_id = ?",
                (row[0] + len(stored), now, session_id),
            )
        return stored

    # Events

    def append_events(self, events: list[StoredEvent]) -> set[str]:
        """Stores events whose sequences were assigned by the caller (gap-free per session, each
        continuing the session's `last_sequence`), in one transaction. A session whose current
        turn's TurnFinished is among them becomes idle in the same transaction: idle means its
        turn's events are all stored, whatever stops the server after. Returns the ids of
        sessions that no longer exist; their events are dropped."""
        by_session: dict[str, list[tuple[Any, ...]]] = {}
        ended: dict[str, str] = {}
        for event in events:
            kind, payload_json = payload_to_json(event.payload)
            by_session.setdefault(event.session_id, []).append(
                (event.session_id, event.sequence, event.time, event.turn_id, kind, payload_json)
            )
            if isinstance(event.payload, TurnFinished):
                ended[event.session_id] = event.turn_id
        gone: set[str] = set()
        with self._transaction() as db:
            for session_id, rows in by_session.items():
                last = rows[-1]
                # Only the turn the session runs now: a later one may have been marked running
                # since (its own turn id), and stays so. No TurnFinished: NULL, never equal.
                updated = db.execute(
                    "UPDATE sessions SET last_sequence = ?, updated = ?, "
                    "state = CASE WHEN current_turn_id = ? THEN 'idle' ELSE state END WHERE session_id = ?",
                    (last[1], last[2], ended.get(session_id), session_id),
                ).rowcount
                if not updated:
                    gone.add(session_id)
                    continue
                db.executemany(
                    "INSERT INTO events (session_id, sequence, time, turn_id, kind, payload_json) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
        return gone

    def events_after(self, session_id: str, after_sequence: int = 0) -> Iterator[StoredEvent]:
        """Every event with sequence > after_sequence, in order, read a page at a time: only one
        page is held at once, however long the log."""
        while True:
            page = self.event_page(session_id, after_sequence)
            yield from page.events
            if not page.more:
                return
            after_sequence = page.events[-1].sequence

    def last_sequence(self, session_id: str) -> int:
        """Sequence of the session's last event, 0 before the first. Raises `UnknownSession`."""
        row = self._db.execute("SELECT last_sequence FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise UnknownSession(session_id)
        return row[0]


def _session_from_row(row: tuple[Any, ...]) -> SessionRecord:
    session_id, workspace, config_json, labels_json, state, created, updated, last_seq, count, turn_id = row
    return SessionRecord(
        session_id=session_id,
        workspace=workspace,
        config=json.loads(config_json),
        labels=json.loads(labels_json),
        state=state,
        created=created,
        updated=updated,
        last_sequence=last_seq,
        message_count=count,
        current_turn_id=turn_id,
    )


def _message_row(session_id: str, message: StoredMessage) -> tuple[Any, ...]:
    result = message.tool_result
    return (
        session_id,
        message.idx,
        message.role,
        message.text,
        to_json([vars(call) for call in message.tool_calls]),
        message.tool_call_id,
        None if result is None else to_json(vars(result)),
        message.turn_id,
        message.created,
    )


def _message_from_row(row: tuple[Any, ...]) -> StoredMessage:
    idx, role, text, calls_json, tool_call_id, result_json, turn_id, created = row
    return StoredMessage(
        idx=idx,
        role=role,
        text=text,
        tool_calls=[call_from_dict(call) for call in json.loads(calls_json)],
        tool_call_id=tool_call_id,
        tool_result=None if result_json is None else result_from_dict(json.loads(result_json)),
        turn_id=turn_id,
        created=created,
    )


class _Checkpointer:
    """Checkpoints the store's WAL in a thread of its own, `delay` seconds after a commit, so that
    the fsyncs happen off the thread that writes.

    A PASSIVE checkpoint takes no lock a writer waits for: commits go on meanwhile, and what they
    add is left to the next one. Once a checkpoint has copied the whole WAL, the next write starts
    the WAL over from its beginning, so SQLite's own checkpoint (at ~1000 pages, in a commit) is
    reached only by a writer that never pauses for `delay`.
    """

    def __init__(self, path: Path, delay: float) -> None:
        self._path = path
        self._delay = delay
        self._written = threading.Event()
        self._closing = threading.Event()
        # Commits so far, and how many of them a finished checkpoint covered (under `_done`).
        self._commits = 0
        self._checkpointed = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="codelane-store-checkpoints", daemon=True)
        self._thread.start()

    def written(self) -> None:
        self._commits += 1  # only the writing thread counts
        if not self._written.is_set():
            self._written.set()

    def wait_checkpointed(self, timeout: float) -> bool:
        """True once a checkpoint that began after the last commit so far has finished (False
        after `timeout` seconds): what tests wait on, rather than on time."""
        commits = self._commits
        with self._done:
            return self._done.wait_for(lambda: self._checkpointed >= commits, timeout)

    def close(self) -> None:
        self._closing.set()
        self._written.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error as exc:
            log.warning("cannot open %s to checkpoint it (%s): its commits checkpoint it", self._path, exc)
            return
        try:
            # Checked before each wait: a close() that set `_written` just before the clear below
            # would otherwise leave this waiting for ever.
            while not self._closing.is_set():
                self._written.wait()
                # Commits made while this waits share the checkpoint.
                if self._closing.wait(self._delay):
                    return
                self._written.clear()
                # Read after the clear: a commit counted later sets the flag again.
                commits = self._commits
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # SQLite's own checkpoint still runs in the commits
                    log.warning("checkpointing %s failed: %s", self._path, exc)
                with self._done:
                    self._checkpointed = commits
                    self._done.notify_all()
        finally:
            db.close()


def _closed() -> sqlite3.ProgrammingError:
    # What a read of a closed connection raises: a caller sees the same error, whether its read
    # was asked for after the store closed or was under way then.
    return sqlite3.ProgrammingError("Cannot operate on a closed database.")


class _Reader:
    """Runs `Store.read`'s queries in threads of its own, each on a read-only connection it
    opens (and opens again after a failure) and closes itself: a connection belongs to the thread
    that opened it. A query's failure is its caller's; the threads go on."""

    def __init__(self, path: Path, threads: int) -> None:
        self._uri = f"{path.absolute().as_uri()}?mode=ro"
        # Queries with the future of their result; None tells a thread to stop.
        self._jobs: queue.SimpleQueue[tuple[Callable[[Reads], Any], Future[Any]] | None] = queue.SimpleQueue()
        # Set under `_lock`, so that no query is queued behind the threads' stop.
        self._closing = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name="codelane-store-reader", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, query: Callable[[Reads], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if not self._closing:
                self._jobs.put((query, future))
                return future
        future.set_exception(_closed())
        return future

    def close(self) -> None:
        """Stops the threads once they have failed the queries still queued (as a closed store
        does) and stopped the ones under way: SQLite's part of a read stops at its next check
        (READER_CLOSING_CHECK_STEPS), the conversion of rows already read runs to its end. No
        thread outlives its store."""
        with self._lock:
            self._closing = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _connect(self) -> sqlite3.Connection:
        # Opened by the thread, once the store has opened the file (in WAL mode, where readers
        # and the writer do not wait for each other). Autocommit: a read transaction lasts one
        # statement, so each read sees the last commit.
        db = sqlite3.connect(self._uri, uri=True, isolation_level=None)
        # A progress handler rather than interrupt() from close(): an interrupt that lands before
        # the statement starts is lost, and close() would wait for the whole read.
        db.set_progress_handler(lambda: self._closing, READER_CLOSING_CHECK_STEPS)
        return db

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while (job := self._jobs.get()) is not None:
                db = self._serve(db, *job)
                del job  # nothing of a read (a whole history) stays held while the thread waits
        finally:
            if db is not None:
                db.close()

    def _serve(self, db: sqlite3.Connection | None, query: Callable[[Reads], Any],
               future: Future[Any]) -> sqlite3.Connection | None:
        """Runs one query (on `db`, opened now if None); returns the connection to use next."""
        if not future.set_running_or_notify_cancel():
            return db  # its caller stopped waiting before it started
        try:
            if self._closing:
                raise _closed()
            if db is None:
                db = self._connect()
            result = query(Reads(db))
        except BaseException as exc:  # the caller's to handle: the thread serves the next one
            future.set_exception(_closed() if self._closing else exc)
            # A query that failed half-way may leave a statement open (its traceback, which the
            # caller holds, holds the cursor): it keeps its read transaction, and the reads after
            # it on the connection would see the store as it was then. A new one sees the last commit.
            if db is not None:
                db.close()
            return None
        future.set_result(result)
        return db
