import base64
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from session_server.events import (
    CallInfo,
    EventPayload,
    StoredEvent,
    TextDelta,
    ToolCallFinished,
    TurnFinished,
    TurnStarted,
)
from session_server.llm.base import Usage
from session_server.readiness import probe_store
from session_server.store import (
    CHECKPOINT_DELAY,
    EVENT_PAGE_SIZE,
    MAX_PAGE_CHARS,
    MAX_READ_PAGE_CHARS,
    SCHEMA_VERSION,
    SessionExists,
    SessionRecord,
    Store,
    StoredMessage,
    StoreError,
    UnknownSession,
)
from tool_worker.tools.base import ErrorKind, ToolResult


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "codelane.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    store = Store(path)
    yield store
    store.close()


def record(session_id: str, created: float = 1000.0, **extra) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        workspace="/ws",
        config={"model": "scripted", "query_concurrency": 4, "nested": {"a": [1, 2]}},
        labels={"team": "x"},
        created=created,
        updated=created,
        **extra,
    )


def conversation() -> list[StoredMessage]:
    call = CallInfo("c1", "read", '{"path": "a"}', "query", 0)
    return [
        StoredMessage(role="user", text="hi", turn_id="t1"),
        StoredMessage(role="assistant", text="reading", tool_calls=[call], turn_id="t1"),
        StoredMessage(
            role="tool",
            text="contents",
            tool_call_id="c1",
            tool_result=ToolResult.error(ErrorKind.TIMEOUT, "timed out", worker_id="w1"),
            turn_id="t1",
        ),
    ]


def test_wal_mode(store: Store, path: Path) -> None:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_session_crud(store: Store) -> None:
    rec = record("s1")
    store.create_session(rec)
    assert store.get_session("s1") == rec
    assert store.get_session("nope") is None
    with pytest.raises(SessionExists):
        store.create_session(record("s1"))

    store.set_session_state("s1", "running", "t1")
    got = store.get_session("s1")
    assert got is not None
    assert (got.state, got.current_turn_id) == ("running", "t1")
    assert got.updated > rec.updated
    with pytest.raises(UnknownSession):
        store.set_session_state("nope", "idle", "")
    with pytest.raises(ValueError, match="state"):
        store.set_session_state("s1", "sleeping", "t1")  # type: ignore[arg-type]

    assert store.delete_session("s1") is True
    assert store.delete_session("s1") is False
    assert store.get_session("s1") is None


def test_list_sessions_pages_newest_first(store: Store) -> None:
    # Two sessions share a created time: the id breaks the tie, so none is skipped or repeated.
    for i, created in enumerate([1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0]):
        store.create_session(record(f"s{i}", created=created))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = store.list_sessions(page_size=3, page_token=token)
        pages += 1
        seen += [s.session_id for s in page]
        if not token:
            break
    assert pages == 3
    assert seen == ["s6", "s5", "s4", "s3", "s2", "s1", "s0"]

    everything, token = store.list_sessions()
    assert len(everything) == 7 and token == ""

    # A session created between pages appears on no later page; the walk stays consistent.
    first, token = store.list_sessions(page_size=2)
    store.create_session(record("new", created=10.0))
    second, _ = store.list_sessions(page_size=2, page_token=token)
    assert [s.session_id for s in first + second] == ["s6", "s5", "s4", "s3"]


def test_a_page_of_sessions_stops_before_its_size_limit(store: Store) -> None:
    # 24 sessions of 1 MiB of configuration each: one page of 50 would not fit in a gRPC message.
    bulky = "p" * (1024 * 1024)
    for i in range(24):
        store.create_session(dataclasses.replace(record(f"s{i:02d}", created=float(i)),
                                                 config={"system_prompt": bulky}))
    seen, pages, token = [], 0, ""
    while True:
        page, token = store.list_sessions(page_size=50, page_token=token)
        pages += 1
        assert page and sum(len(s.config["system_prompt"]) for s in page) <= MAX_PAGE_CHARS
        seen += [s.session_id for s in page]
        if not token:
            break
    assert pages > 1 and seen == [f"s{i:02d}" for i in reversed(range(24))]


def test_exact_page_has_no_next_token(store: Store) -> None:
    for i in range(4):
        store.create_session(record(f"s{i}", created=float(i)))
    page, token = store.list_sessions(page_size=4)
    assert len(page) == 4 and token == ""


# Arrays nested deeper than Python's stack: json.loads raised RecursionError, which no handler took.
NESTED_TOKEN = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()


@pytest.mark.parametrize("token", ["garbage!", "e30=", "WzEsMiwzXQ==", "WyJ4IiwgInkiXQ==", "\u00e9", NESTED_TOKEN])
def test_bad_page_token(store: Store, token: str) -> None:
    with pytest.raises(ValueError, match="invalid page token") as caught:
        store.list_sessions(page_size=10, page_token=token)
    assert len(str(caught.value)) < 300  # a long token is not echoed whole


def test_negative_page_size(store: Store) -> None:
    with pytest.raises(ValueError, match="page_size"):
        store.list_sessions(page_size=-1)


def test_messages_get_idx_in_order(store: Store) -> None:
    store.create_session(record("s1"))
    first = store.append_messages("s1", conversation())
    assert [m.idx for m in first] == [0, 1, 2]
    second = store.append_messages("s1", [StoredMessage(role="user", text="again", turn_id="t2")])
    assert [m.idx for m in second] == [3]

    got = store.get_messages("s1")
    assert got == first + second
    assert got[2].tool_result is not None and got[2].tool_result.error_kind is ErrorKind.TIMEOUT
    assert got[1].tool_calls == [CallInfo("c1", "read", '{"path": "a"}', "query", 0)]
    assert [m.idx for m in store.get_messages("s1", offset=1, limit=2)] == [1, 2]
    assert store.get_messages("s1", offset=4) == []
    session = store.get_session("s1")
    assert session is not None and session.message_count == 4


def test_append_messages_is_atomic(store: Store) -> None:
    store.create_session(record("s1"))
    with pytest.raises(ValueError, match="role"):
        store.append_messages("s1", [StoredMessage(role="user"), StoredMessage(role="robot")])  # type: ignore[arg-type]
    with pytest.raises(UnknownSession):
        store.append_messages("nope", [StoredMessage(role="user")])
    assert store.get_messages("s1") == []
    session = store.get_session("s1")
    assert session is not None and session.message_count == 0


def append(store: Store, session_id: str, turn_id: str, payload: EventPayload, at: float = 0.0) -> StoredEvent:
    """One event with the session's next sequence, as the event log assigns it."""
    event = StoredEvent(session_id, store.last_sequence(session_id) + 1, at or 1.0, turn_id, payload)
    assert store.append_events([event]) == set()
    return event


def test_event_sequences_are_gap_free_and_monotonic(store: Store) -> None:
    store.create_session(record("a"))
    store.create_session(record("b"))
    sequences: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(1000):
        session_id = "a" if i % 3 else "b"
        event = append(store, session_id, "t1", TextDelta(text=str(i), step=0), at=1000.0 + i)
        sequences[session_id].append(event.sequence)
    for session_id, seen in sequences.items():
        assert seen == list(range(1, len(seen) + 1))
        assert store.last_sequence(session_id) == len(seen)
        stored = list(store.events_after(session_id))
        assert [e.sequence for e in stored] == seen
        assert all(e.session_id == session_id and e.turn_id == "t1" for e in stored)
        times = [e.time for e in stored]
        assert times == sorted(times)


def test_a_batch_of_several_sessions_is_one_append(store: Store) -> None:
    store.create_session(record("a"))
    store.create_session(record("b"))
    batch = [
        StoredEvent("a", 1, 5.0, "t1", TurnStarted(user_text="hi")),
        StoredEvent("b", 1, 5.0, "t9", TurnStarted(user_text="yo")),
        StoredEvent("a", 2, 6.0, "t1", TextDelta(text="x", step=0)),
        StoredEvent("gone", 1, 6.0, "t0", TextDelta(text="lost", step=0)),
    ]
    assert store.append_events(batch) == {"gone"}  # a deleted session's events are dropped
    assert list(store.events_after("a")) == [batch[0], batch[2]]
    assert list(store.events_after("b")) == [batch[1]]
    assert (store.last_sequence("a"), store.last_sequence("b")) == (2, 1)
    assert list(store.events_after("gone")) == []


@pytest.mark.parametrize(
    ("text", "metadata"),
    [
        ("plain", {"total": 50, "path": "src/a.py"}),
        ("caf\u00e9 \U0001f600", {"lines": [1, 2], "ratio": 0.5}),
        # What orjson refuses and the standard library writes: a file name read with
        # surrogateescape, an integer past 64 bits, a key that is not a string.
        ("bad-\udcff-name.py", {"size": 2**70, 7: "seven"}),
    ],
    ids=["ascii", "unicode", "refused-by-orjson"],
)
def test_events_and_messages_round_trip_whatever_their_strings(store: Store, text: str, metadata: dict) -> None:
    store.create_session(record("s1"))
    result = ToolResult(output=text, metadata=metadata, worker_id="w1", queue_wait=0.25, run_time=1.5)
    event = append(store, "s1", "t1", ToolCallFinished(call_id="c1", tool_name="read", result=result,
                                                      queue_wait=0.25, run_time=1.5))
    call = CallInfo("c1", "read", f'{{"path": "{text}"}}', "query", 0)
    store.append_messages("s1", [
        StoredMessage(role="assistant", text="reading", tool_calls=[call], turn_id="t1"),
        StoredMessage(role="tool", text="read", tool_call_id="c1", tool_result=result, turn_id="t1"),
    ])
    # JSON has only string keys: a key that was not one comes back as its text.
    stored_metadata = {str(key): value for key, value in metadata.items()}
    (stored_event,) = store.events_after("s1")
    assert stored_event.payload.result.metadata == stored_metadata
    assert stored_event.payload.result.output == text
    assert stored_event.payload.queue_wait == event.payload.queue_wait
    messages = store.get_messages("s1")
    assert messages[0].tool_calls == [call]
    assert messages[1].tool_result is not None and messages[1].tool_result.output == text
    assert messages[1].tool_result.metadata == stored_metadata


def test_what_json_has_no_type_for_is_stored_as_its_text(store: Store) -> None:
    # A plugin tool's metadata may hold anything; the event is stored all the same.
    store.create_session(record("s1"))
    result = ToolResult(output="ok", metadata={"path": Path("/ws/a.py"), "tags": frozenset({"x"})})
    append(store, "s1", "t1", ToolCallFinished(call_id="c1", tool_name="plugin", result=result,
                                              queue_wait=0.0, run_time=0.0))
    store.append_messages("s1", [StoredMessage(role="tool", text="ok", tool_call_id="c1", tool_result=result)])
    (stored,) = store.events_after("s1")
    assert stored.payload.result.metadata == {"path": "/ws/a.py", "tags": "frozenset({'x'})"}
    assert store.get_messages("s1")[0].tool_result.metadata == stored.payload.result.metadata


def test_events_after_and_limit(store: Store) -> None:
    store.create_session(record("s1"))
    sent = [append(store, "s1", "t1", TextDelta(text=f"d{i}", step=0)) for i in range(10)]
    assert list(store.events_after("s1", after_sequence=7)) == sent[7:]
    page = store.event_page("s1", after_sequence=2, limit=3)
    assert (page.events, page.more) == (sent[2:5], True)
    page = store.event_page("s1", after_sequence=7, limit=3)
    assert (page.events, page.more) == (sent[7:], False)  # a full page at the end: nothing more
    assert list(store.events_after("s1", after_sequence=10)) == []
    assert list(store.events_after("nope")) == []


def _big_result(call_id: str, chars: int) -> ToolResult:
    return ToolResult(output=call_id[-1] * chars)


def test_a_page_of_big_events_stops_by_size_and_pages_return_every_event_once(store: Store) -> None:
    # 40 tool results of 300 Ki characters: 12 MB that one page of 500 held whole. Each page
    # stops before its payloads pass the bound, and reading on after a short page finds the rest.
    store.create_session(record("s1"))
    sent = [append(store, "s1", "t1", ToolCallFinished(f"c{i}", "read", _big_result(f"c{i}", 300 * 1024), 0.0, 0.0))
            for i in range(40)]
    sent.append(append(store, "s1", "t1", TextDelta(text="small", step=1)))
    read: list[StoredEvent] = []
    pages = []
    after = 0
    while True:
        page = store.event_page("s1", after)
        pages.append(page)
        read += page.events
        if not page.more:
            break
        after = page.events[-1].sequence
    assert read == sent  # each once, in order
    assert len(pages) >= 3
    assert all(0 < len(page.events) < EVENT_PAGE_SIZE for page in pages)
    assert all(page.chars <= MAX_READ_PAGE_CHARS for page in pages)
    # Short as they are, only the last page says the log ends there.
    assert [page.more for page in pages] == [True] * (len(pages) - 1) + [False]
    assert list(store.events_after("s1")) == sent


def test_an_event_bigger_than_a_page_comes_alone(store: Store) -> None:
    store.create_session(record("s1"))
    small = append(store, "s1", "t1", TextDelta(text="before", step=0))
    huge = append(store, "s1", "t1", ToolCallFinished("c1", "read", _big_result("c1", 2048), 0.0, 0.0))
    last = append(store, "s1", "t1", TextDelta(text="after", step=0))
    first = store.event_page("s1", 0, max_chars=1024)
    assert (first.events, first.more) == ([small], True)
    alone = store.event_page("s1", small.sequence, max_chars=1024)
    assert (alone.events, alone.more) == ([huge], True) and alone.chars > 1024
    rest = store.event_page("s1", huge.sequence, max_chars=1024)
    assert (rest.events, rest.more) == ([last], False)


def test_a_page_of_big_messages_stops_by_size_and_offsets_return_every_message_once(store: Store) -> None:
    store.create_session(record("s1"))
    sent = store.append_messages("s1", [
        StoredMessage(role="tool", text="", tool_call_id=f"c{i}", tool_result=_big_result(f"c{i}", 300 * 1024))
        for i in range(40)
    ])
    read: list[StoredMessage] = []
    pages = 0
    while len(read) < len(sent):
        page = store.get_messages("s1", offset=len(read), limit=1000, max_chars=MAX_READ_PAGE_CHARS)
        assert 0 < len(page) < 20  # about 13 of 300 Ki in 4 Mi
        read += page
        pages += 1
    assert read == sent and pages >= 3
    assert len(store.get_messages("s1", limit=1000)) == 40  # no bound asked: the whole history


def test_an_unknown_session_has_no_sequence(store: Store) -> None:
    with pytest.raises(UnknownSession):
        store.last_sequence("nope")


def test_store_belongs_to_its_thread(store: Store) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            store.get_session("s1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], sqlite3.ProgrammingError)


def test_everything_survives_reopen(path: Path) -> None:
    store = Store(path)
    store.create_session(record("s1"))
    store.create_session(record("s2", created=2000.0))
    messages = store.append_messages("s1", conversation())
    result = ToolResult(output="ok", exit_code=0, metadata={"k": [1]})
    events = [
        append(store, "s1", "t1", TurnStarted(user_text="hi")),
        append(store, "s1", "t1", ToolCallFinished("c1", "read", result, 0.001, 0.2)),
        append(store, "s1", "t1", TurnFinished("end_turn", Usage(5, 6, 1), 1, 1, "done")),
    ]
    before = store.get_session("s1")
    store.close()

    store = Store(path)
    try:
        assert store.get_session("s1") == before
        assert [s.session_id for s in store.list_sessions()[0]] == ["s2", "s1"]
        assert store.get_messages("s1") == messages
        assert list(store.events_after("s1")) == events
        # Sequences continue after a restart, without a gap or a repeat.
        assert store.last_sequence("s1") == 3
        assert store.append_messages("s1", [StoredMessage(role="user")])[0].idx == 3
    finally:
        store.close()


def test_interrupted_turns_after_reopen(path: Path) -> None:
    store = Store(path)
    store.create_session(record("busy"))
    store.create_session(record("quiet"))
    store.create_session(record("done"))
    store.set_session_state("busy", "running", "t7")
    store.set_session_state("done", "running", "t1")
    store.set_session_state("done", "idle", "t1")
    store.close()  # as if the server stopped mid-turn

    store = Store(path)
    try:
        assert store.interrupted_turns() == [("busy", "t7")]
        store.set_session_state("busy", "idle", "t7")
        assert store.interrupted_turns() == []
    finally:
        store.close()


def test_delete_cascades(store: Store, path: Path) -> None:
    store.create_session(record("gone"))
    store.create_session(record("kept"))
    for session_id in ("gone", "kept"):
        store.append_messages(session_id, conversation())
        append(store, session_id, "t1", TurnStarted(user_text="hi"))
    assert store.delete_session("gone")

    assert store.get_messages("gone") == []
    assert list(store.events_after("gone")) == []
    assert len(store.get_messages("kept")) == 3
    assert len(list(store.events_after("kept"))) == 1
    db = sqlite3.connect(path)
    for table in ("sessions", "messages", "events"):
        assert db.execute(f"SELECT count(*) FROM {table} WHERE session_id = 'gone'").fetchone()[0] == 0
    db.close()

    # A new session with the old id starts from scratch.
    store.create_session(record("gone"))
    assert store.last_sequence("gone") == 0


def test_newer_schema_is_refused(path: Path) -> None:
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer codelane"):
        Store(path)


def test_not_a_database_is_refused(path: Path) -> None:
    path.write_bytes(b"this is not sqlite, just some text that is long enough to have a header" * 10)
    with pytest.raises(StoreError, match="not a codelane store"):
        Store(path)


def test_writes_wait_for_the_readiness_probe_rather_than_fail(store: Store, path: Path) -> None:
    """The readiness probe takes the write lock from its own connection, in a thread, every few
    seconds. A write of the store's that meets it must wait for it (the busy timeout), never fail:
    a deferred transaction that reads first and then writes gets 'database is locked' at once in
    WAL mode, which ended turns under load with an error."""
    store.create_session(record("s1"))
    probing = threading.Event()
    stop = threading.Event()
    problems: list[str] = []

    def probe() -> None:
        while not stop.is_set():
            problem = probe_store(path)
            if problem is not None:
                problems.append(problem)
            probing.set()

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        probing.wait()
        for turn in range(300):
            store.append_messages("s1", [StoredMessage(role="user", text=f"turn {turn}", turn_id=f"t{turn}")])
            append(store, "s1", f"t{turn}", TurnStarted(user_text=f"turn {turn}"))
    finally:
        stop.set()
        thread.join()
    assert len(store.get_messages("s1")) == 300
    assert problems == []


def _checkpointer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "codelane-store-checkpoints"]


def _burst(store: Store, first: int) -> int:
    """About 1 MB of events in 12 commits, as a turn's results come; returns the next sequence."""
    output = "x" * 12_000
    for _ in range(12):
        store.append_events([
            StoredEvent("s1", sequence, 1.0, "t1", ToolCallFinished(f"c{sequence}", "read", ToolResult(output=output),
                                                                    0.0, 0.0))
            for sequence in range(first, first + 8)
        ])
        first += 8
    return first


@pytest.mark.parametrize("delay", [CHECKPOINT_DELAY, 0.0, None], ids=["checkpointer", "no-delay", "sqlite-checkpoints"])
def test_the_checkpointer_thread_keeps_the_wal_short_so_no_commit_has_to_checkpoint(path: Path, delay) -> None:
    # A checkpoint fsyncs the WAL and the database (milliseconds): left to SQLite, the commit that
    # passes ~1000 WAL pages (4 MB) runs one on the event loop. The thread checkpoints each burst
    # of commits once it is over, so the WAL starts over and stays about one burst long.
    store = Store(path, checkpoint_delay=delay)
    try:
        store.create_session(record("s1"))
        sequence, largest = 1, 0
        for _ in range(8):
            sequence = _burst(store, sequence)
            if store.checkpointer is not None:
                assert store.checkpointer.wait_checkpointed(timeout=30)
            largest = max(largest, Path(f"{path}-wal").stat().st_size)
        if delay is None:
            assert largest > 3_500_000  # the control: SQLite waits for ~4 MB of WAL, in a commit
        else:
            assert largest < 2_000_000
            # Whatever was committed is in the database already: a checkpoint finds nothing to copy.
            reader = sqlite3.connect(path)
            busy, frames, copied = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            reader.close()
            assert busy == 0 and frames == copied
        assert [e.sequence for e in store.event_page("s1", sequence - 3).events] == [sequence - 2, sequence - 1]
    finally:
        store.close()
    assert not _checkpointer_threads()
    assert not Path(f"{path}-wal").exists()  # the last connection to close checkpointed and removed it


def test_a_store_that_cannot_open_leaves_no_checkpointer_behind(path: Path) -> None:
    path.write_bytes(b"this is not sqlite, just some text that is long enough to have a header" * 10)
    with pytest.raises(StoreError):
        Store(path)
    assert not _checkpointer_threads()
    assert not [t for t in threading.enumerate() if t.name == "codelane-store-reader"]  # nor a reader


def test_a_close_that_lands_between_the_threads_wait_and_its_clear_still_stops_it(path: Path) -> None:
    # close() sets `_written` to wake the thread; landing just before the thread clears it after a
    # commit's wait, it was cleared away and the thread waited for ever (a server's stop hung).
    store = Store(path, checkpoint_delay=0.0)
    checkpointer = store.checkpointer
    assert checkpointer is not None
    clear = checkpointer._written.clear

    def clear_right_after_a_close() -> None:
        checkpointer._closing.set()  # what close() does, in that order
        checkpointer._written.set()
        clear()

    checkpointer._written.clear = clear_right_after_a_close
    store.create_session(record("s1"))  # a commit wakes the thread
    checkpointer._thread.join(timeout=30)
    assert not checkpointer._thread.is_alive()
    store.close()
