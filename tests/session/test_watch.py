"""WatchEvents: replay, caught_up, live follow, resume from the middle, OUT_OF_RANGE, and slow
subscribers (behind in events, or in bytes) that are never cut off, catch up from the store and
lose nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from prometheus_client.utils import floatToGoString

from codelane.v1 import events_pb2
from session_server.bus import SessionClosed
from session_server.store import MAX_READ_PAGE_CHARS
from tests.session.conftest import (
    STREAM_TIMEOUT,
    Client,
    InProcess,
    assert_gap_free,
    call,
    kind,
    read_until,
    rpc_error,
    scripted,
)


def _script(tmp_path: Path) -> str:
    return scripted(
        tmp_path,
        [
            {
                "text": "First I look.",
                "tool_calls": [call("grep", pattern="needle"), call("read", file_path="a.txt")],
            },
            {"text": "First turn done."},
            {"text": "Second turn, one more look.", "tool_calls": [call("ls", path="src")]},
            {"text": "Second turn done."},
        ],
    )


async def test_replay_caught_up_follow_and_resume(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, _script(tmp_path))
    sid = session.session_id

    # An empty log: just the marker.
    assert await client.watch(sid) == ([], 0)

    turn1 = await client.send(sid, "turn one")
    last = turn1[-1].sequence
    assert_gap_free(turn1)

    # follow=False: every stored event, the marker, the end.
    replay, caught_up = await client.watch(sid, after=0)
    assert replay == turn1 and caught_up == last

    # Resume from the middle: exactly the rest.
    middle = last // 2
    rest, caught_up = await client.watch(sid, after=middle)
    assert rest == turn1[middle:] and caught_up == last
    assert await client.watch(sid, after=last) == ([], last)

    # Beyond the end: OUT_OF_RANGE naming the last sequence.
    for after in (last + 1, last + 100):
        error = await rpc_error(client.watch(sid, after=after))
        assert error.code == grpc.StatusCode.OUT_OF_RANGE
        assert error.reason == "SEQUENCE_OUT_OF_RANGE"
        assert error.metadata == {"last_sequence": str(last)}

    # A negative sequence is a bad argument, not a range problem.
    error = await rpc_error(client.watch(sid, after=-1))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "after_sequence"}

    # follow=True: replay, marker, then the live events of the next turn.
    watch = client.watch_stream(sid, after=0, follow=True)
    items: list = []
    try:
        marker = await read_until(watch, lambda r: r.HasField("caught_up"), items)
        assert marker.caught_up.last_sequence == last
        assert [i.event for i in items[:-1]] == turn1
        turn2 = await client.send(sid, "turn two")
        live: list = []
        await read_until(watch, lambda r: r.HasField("event") and kind(r.event) == "turn_finished", live)
    finally:
        watch.cancel()
    assert all(i.HasField("event") for i in live)
    assert [i.event for i in live] == turn2
    assert_gap_free(turn1 + turn2)
    assert turn2[0].turn_id != turn1[0].turn_id
    assert turn2[-1].turn_finished.final_text == "Second turn done."

    # Two watchers from different points agree with the log.
    everything, caught_up = await client.watch(sid)
    assert everything == turn1 + turn2 and caught_up == turn2[-1].sequence


async def test_follow_from_the_end_sees_only_new_events(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, _script(tmp_path))
    turn1 = await client.send(session.session_id, "turn one")
    watch = client.watch_stream(session.session_id, after=turn1[-1].sequence, follow=True)
    items: list = []
    try:
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.caught_up.last_sequence == turn1[-1].sequence
        turn2 = await client.send(session.session_id, "turn two")
        await read_until(watch, lambda r: kind(r.event) == "turn_finished", items)
    finally:
        watch.cancel()
    assert [i.event for i in items] == turn2


async def test_a_slow_subscriber_is_never_cut_off_and_misses_nothing(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A buffer of 5 live events, and two subscribers that read nothing while a turn of hundreds
    # of events runs: both fall far behind, catch up from the store, and get every event once.
    client: Client = (await make_server(subscriber_buffer=5)).client
    calls = [
        call("read" if i % 2 else "grep", **({"file_path": "a.txt"} if i % 2 else {"pattern": "needle"}))
        for i in range(30)
    ]
    long_text = " ".join(f"word{i}" for i in range(200))
    model = scripted(tmp_path, [{"text": long_text, "tool_calls": calls}, {"text": long_text}])
    session = await client.create(workspace, model)
    sid = session.session_id

    watch = client.watch_stream(sid, after=0, follow=True)
    send = None
    try:
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.HasField("caught_up") and first.caught_up.last_sequence == 0  # subscribed: now stop reading
        # Only now: a turn started with the watch still on its way could store its first events
        # before the subscription, and the watch would begin with them instead of caught_up.
        send = client.send_stream(sid, "lots of events please")
        started = await asyncio.wait_for(send.read(), 10)  # the turn is running: idle now means finished
        assert kind(started.event) == "turn_started"
        final = await client.wait_idle(sid, within=STREAM_TIMEOUT)  # the turn ran to its end with nobody reading
        total = final.last_sequence
        assert total > 60

        sent = [started.event] + [m.event async for m in send]  # the turn's own stream ends after TurnFinished
        watched: list[events_pb2.Event] = []
        while len(watched) < total:
            item = await asyncio.wait_for(watch.read(), 10)
            assert item is not grpc.aio.EOF
            watched.append(item.event)
    finally:
        watch.cancel()
        if send is not None:
            send.cancel()

    everything, caught_up = await client.watch(sid)
    assert caught_up == total
    assert_gap_free(everything)
    assert watched == everything
    assert sent == everything  # the turn's events are all of the session's
    assert kind(everything[-1]) == "turn_finished"


async def test_a_watcher_that_does_not_read_holds_at_most_its_bytes_and_misses_nothing(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A turn of big tool results (60 reads of a 190 KB file) while one watcher reads nothing and
    # the turn's own stream reads everything: the idle watcher passes the byte bound long before
    # the 10,000-event one, so the server drops what it holds for it and, once it reads again,
    # sends what it missed from the store.
    buffer_bytes = 1024 * 1024
    running = await make_server(subscriber_buffer_bytes=buffer_bytes)
    client: Client = running.client
    (workspace / "big.txt").write_text(("y" * 1900 + "\n") * 100, encoding="utf-8")
    reads = [call("read", file_path="big.txt") for _ in range(60)]
    model = scripted(tmp_path, [{"text": "Reading.", "tool_calls": reads}, {"text": "Read it all."}])
    session = await client.create(workspace, model)
    sid = session.session_id

    idle = client.watch_stream(sid, after=0, follow=True)
    try:
        first = await asyncio.wait_for(idle.read(), 10)
        assert first.HasField("caught_up")  # subscribed: from now on it reads nothing
        sent = await client.send(sid, "read the big file, many times")
        assert sent[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
        results = [e.tool_call_finished.result.output for e in sent if kind(e) == "tool_call_finished"]
        assert len(results) == 60 and all(len(output) > 190_000 for output in results)
        await client.wait_idle(sid)  # every event of the turn is published
        [held] = running.server.sessions.bus._subscribers[sid]  # the idle watcher's: the turn's stream ended
        assert held.queued_bytes <= buffer_bytes

        watched: list[events_pb2.Event] = []
        while len(watched) < len(sent):
            item = await asyncio.wait_for(idle.read(), 10)
            assert item is not grpc.aio.EOF
            watched.append(item.event)
    finally:
        idle.cancel()
    assert watched == sent
    assert_gap_free(watched)
    pages, within = _replay_pages(running)
    assert pages >= 2 and within == pages  # it caught up on 11 MB in pages bounded in size


def _replay_pages(running: InProcess) -> tuple[int, int]:
    """Pages of events the server has read from its store for streams, and how many of them
    held at most the page bound (codelane_event_replay_page_chars)."""
    metrics = running.server.metrics.registry
    count = metrics.get_sample_value("codelane_event_replay_page_chars_count") or 0
    bound = {"le": floatToGoString(MAX_READ_PAGE_CHARS)}
    within = metrics.get_sample_value("codelane_event_replay_page_chars_bucket", bound)
    return int(count), int(within or 0)


async def test_a_replay_of_big_events_reads_pages_bounded_in_size_and_sends_each_event_once(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # 60 reads of a 190 KB file: 11 MB of events, which the store handed over as one page of
    # 500 events. Each page now stops at the bound, a short page is not the end of the log, and
    # a watcher from sequence 0 gets every event once, in order, with or without follow.
    running = await make_server()
    client: Client = running.client
    (workspace / "big.txt").write_text(("z" * 1900 + "\n") * 100, encoding="utf-8")
    reads = [call("read", file_path="big.txt") for _ in range(60)]
    model = scripted(tmp_path, [{"text": "Reading.", "tool_calls": reads}, {"text": "Read it all."}])
    session = await client.create(workspace, model)
    sid = session.session_id
    sent = await client.send(sid, "read the big file, many times")
    assert sent[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert sum(len(e.tool_call_finished.result.output) for e in sent if kind(e) == "tool_call_finished") > 11_000_000
    await client.wait_idle(sid)  # every event stored

    before, _ = _replay_pages(running)
    replayed, caught_up = await client.watch(sid, after=0)
    assert replayed == sent and caught_up == sent[-1].sequence
    pages, within = _replay_pages(running)
    assert pages - before >= 3  # 11 MB in pages of at most 4 Mi characters
    assert within == pages  # no page ever held more than the bound

    follow = client.watch_stream(sid, after=0, follow=True)
    items: list = []
    try:
        marker = await read_until(follow, lambda r: r.HasField("caught_up"), items)
    finally:
        follow.cancel()
    assert marker.caught_up.last_sequence == sent[-1].sequence
    assert [item.event for item in items[:-1]] == sent
    assert_gap_free(replayed)


async def test_a_session_deleted_in_the_middle_of_a_replay_ends_the_watch(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # 25 reads of a 190 KB file: two pages of events. The session is deleted once the first page
    # is handed over: the next page is empty, and a follow subscription made then waited for good
    # (the session's subscribers had been closed already). Each watch now ends, saying so.
    running = await make_server()
    (workspace / "big.txt").write_text(("w" * 1900 + "\n") * 100, encoding="utf-8")
    reads = [call("read", file_path="big.txt") for _ in range(25)]
    model = scripted(tmp_path, [{"text": "Reading.", "tool_calls": reads}, {"text": "Read it all."}])
    manager = running.server.sessions
    watches = []
    for follow in (True, False):
        session = await running.client.create(workspace, model)
        await running.client.send(session.session_id, "read the big file, many times")
        await running.client.wait_idle(session.session_id)
        watch = manager.watch(session.session_id, 0, follow=follow)
        first_page = await asyncio.wait_for(anext(watch), STREAM_TIMEOUT)
        assert isinstance(first_page, list) and first_page[0].sequence == 1
        await manager.delete_session(session.session_id)
        watches.append(watch)
    for watch in watches:
        with pytest.raises(SessionClosed):
            await asyncio.wait_for(anext(watch), STREAM_TIMEOUT)
