"""Event streams that break are resumed by the SDK, with no event missed or repeated: a server
with a one-event subscriber buffer cuts every reader that is not instantly there, a proxy drops
connections mid-turn, and a server killed and restarted mid-turn drops the connection."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

import codelane.client
from codelane import events as ev
from codelane.client import Client, CodelaneError, Session
from codelane.sync import Client as SyncClient
from codelane.v1 import events_pb2, session_pb2
from tests.cli.conftest import (
    CLI_TIMEOUT,
    START_TIMEOUT,
    DroppingProxy,
    ThreadedServer,
    call,
    cli,
    cli_env,
    json_lines,
    write_script,
)
from tests.manual_time import ManualTime
from tests.polling import poll_until, wait_until

# Per turn, one step of many Query calls (a burst of events), then the last word.
MANY_CALLS = [
    {"text": "Reading everything at once, in many small words so that the text streams.",
     "tool_calls": [call("read", f"c_{i}", file_path="README.md") for i in range(40)]},
    {"text": "Done."},
] * 2  # fmt: skip


def _resumes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "codelane.client" and "resuming after" in r.message]


def _gap_free(events: list[ev.Event]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


@pytest.fixture
def tiny_buffer(make_server, tmp_path: Path) -> ThreadedServer:
    return make_server(model=write_script(tmp_path / "many.json", MANY_CALLS), subscriber_buffer=1)


async def test_a_send_through_a_one_event_buffer_misses_nothing(tiny_buffer: ThreadedServer, workspace: Path) -> None:
    # The server catches a lagging stream up from its store rather than cutting it; whether a
    # break is resumed is proven by the dropped-connection and kill -9 tests below.
    async with Client(tiny_buffer.address, timeout=10) as client:
        session = await client.create_session(workspace)
        for turn in range(2):
            events = [e async for e in session.send(f"turn {turn}")]
            assert isinstance(events[-1], ev.TurnFinished) and events[-1].stop_reason == "end_turn"
            assert len({e.turn_id for e in events}) == 1
            stored = [e async for e in session.watch(after=events[0].sequence - 1, follow=False)]
            assert events == stored[:-1]  # every stored event of the turn, once, in order
            assert sum(isinstance(e, ev.ToolCallFinished) for e in events) == 40


async def test_a_following_watch_through_a_one_event_buffer_marks_caught_up_once(
    tiny_buffer: ThreadedServer, workspace: Path
) -> None:
    async with Client(tiny_buffer.address, timeout=10) as client:
        session = await client.create_session(workspace)
        watched: list[ev.Event | ev.CaughtUp] = []
        watch = session.watch(follow=True)
        watched.append(await anext(watch))  # caught up on an empty session
        sent = [e async for e in session.send("go")]
        async for item in watch:
            watched.append(item)
            if isinstance(item, ev.TurnFinished):
                break
        await watch.aclose()
    assert watched[0] == ev.CaughtUp(0)
    assert watched[1:] == sent
    _gap_free(sent)


def test_run_json_through_a_one_event_buffer_gets_the_whole_turn(tiny_buffer: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", tiny_buffer.address, "--workspace", str(workspace), "--json", "go")
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["kind"] == "turn_finished" and events[-1]["stop_reason"] == "end_turn"
    assert sum(e["kind"] == "tool_call_finished" for e in events) == 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, data_dir: Path, model: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "codelane.cli", "server", "--listen", f"127.0.0.1:{port}", "--data-dir",
             str(data_dir), "--local-workers", "0", "--model", model, "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cli_env(), start_new_session=True,
        )  # fmt: skip

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        return f"listening on 127.0.0.1:{port}" in log.read_text(errors="replace")

    wait_until(listening, what=lambda: f"the server to listen; its log:\n{log.read_text()}", within=START_TIMEOUT,
               interval=0.05)
    return proc


def test_send_resumes_across_a_server_killed_and_restarted(tmp_path: Path, workspace: Path, mark: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="codelane.client")
    # The sleep never ends on its own: the turn is still running when the server is killed.
    model = write_script(tmp_path / "slow.json", [
        {"text": "Waiting.", "tool_calls": [call("bash", "c_sleep", command=f"sleep {mark}")]},
        {"text": "Never reached."},
    ])  # fmt: skip
    port, data_dir, log = _free_port(), tmp_path / "data", tmp_path / "server.log"
    procs = [_start(port, data_dir, model, log)]
    try:
        with SyncClient(f"127.0.0.1:{port}", timeout=10) as client:
            session = client.create_session(workspace)
            events = []
            for event in session.send("wait"):
                events.append(event)
                if isinstance(event, ev.ToolCallStarted):
                    os.killpg(procs[0].pid, signal.SIGKILL)  # the bash goes too: it is in the group
                    procs[0].wait(10)
                    procs.append(_start(port, data_dir, model, log))
        _gap_free(events)
        assert isinstance(events[-1], ev.TurnFinished) and events[-1].stop_reason == "interrupted"
        assert any("UNAVAILABLE" in line for line in _resumes(caplog))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# A turn whose bash call waits for a file the test creates: the stream is broken while the turn
# runs, with events still to come.
WAITING = [
    {"text": "Reading, then waiting.", "tool_calls": [
        *(call("read", f"c_{i}", file_path="README.md") for i in range(5)),
        call("bash", "c_wait", command="while [ ! -e go ]; do sleep 0.05; done; echo went"),
    ]},
    {"text": "Done."},
]  # fmt: skip


@pytest.fixture
def waiting_server(make_server, tmp_path: Path) -> ThreadedServer:
    return make_server(model=write_script(tmp_path / "waiting.json", WAITING))


@pytest.fixture
def proxy(waiting_server: ThreadedServer):
    """A server with the default buffer, reached through a proxy whose connections the test drops."""
    proxy = DroppingProxy(waiting_server.port)
    yield proxy
    proxy.close()


async def test_send_resumes_when_the_connection_drops(proxy: DroppingProxy, workspace: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="codelane.client")
    async with Client(f"127.0.0.1:{proxy.port}", timeout=10) as client:
        session = await client.create_session(workspace)
        events = []
        async for event in session.send("go"):
            events.append(event)
            if isinstance(event, ev.ToolCallStarted) and event.call.call_id == "c_wait":
                proxy.drop()  # mid-turn: the bash waits for the file below
                (workspace / "go").touch()
        stored = [e async for e in session.watch(follow=False)]
    _gap_free(events)
    assert events == stored[:-1] and events[-1].stop_reason == "end_turn"
    assert proxy.dropped >= 1
    assert any("UNAVAILABLE" in line for line in _resumes(caplog))
    finished = [e for e in events if isinstance(e, ev.ToolCallFinished)]
    assert [e.call_id for e in finished][-1] == "c_wait" and finished[-1].result.output.strip() == "went"


async def test_send_resumes_from_a_server_back_late_in_the_budget(proxy: DroppingProxy, workspace: Path) -> None:
    # gRPC spaces a channel's connection attempts 1 s, 1.6 s, 2.6 s ... 10.5 s apart (up to 2 min):
    # after seven refused (16-19 s), its next came past the resume budget, so a server
    # back meanwhile was never reached and the send raised a stale connection error.
    def server_down_then_back() -> None:
        proxy.refusing = True
        proxy.drop()
        wait_until(lambda: proxy.refused >= 7, what="seven refused connection attempts",
                   within=codelane.client.RESUME_WITHIN)
        proxy.refusing = False
        (workspace / "go").touch()

    async with Client(f"127.0.0.1:{proxy.port}", timeout=10) as client:
        session = await client.create_session(workspace)
        events, outage = [], None
        async for event in session.send("go"):
            events.append(event)
            if isinstance(event, ev.ToolCallStarted) and event.call.call_id == "c_wait":
                outage = asyncio.create_task(asyncio.to_thread(server_down_then_back))
        assert outage is not None
        await outage
    _gap_free(events)
    assert events[-1].stop_reason == "end_turn" and proxy.refused >= 7


def test_run_resumes_when_the_connection_drops(proxy: DroppingProxy, workspace: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "run", "--server", f"127.0.0.1:{proxy.port}", "--workspace",
         str(workspace), "--json", "go"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines = []
        while '"c_wait"' not in (lines[-1] if lines else ""):
            line = proc.stdout.readline()
            assert line, f"codelane run ended early: {proc.stderr.read()}"
            lines.append(line)
        proxy.drop()
        (workspace / "go").touch()
        lines += proc.stdout.readlines()
        err = proc.stderr.read()
        assert proc.wait(CLI_TIMEOUT) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(CLI_TIMEOUT)
    events = json_lines("".join(lines))
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["stop_reason"] == "end_turn" and proxy.dropped >= 1


# -- the resume budget: counted from the break, not from the last event ------------------------------
#
# The budget's clock is a manual one: a quiet spell is the test moving it on, and it stands still
# while a broken stream is resumed, so no test waits or depends on how fast anything is.


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualTime:
    time = ManualTime()
    monkeypatch.setattr(codelane.client, "_clock", time.now)
    return time


async def test_send_resumes_a_break_that_follows_a_quiet_spell(proxy: DroppingProxy, workspace: Path,
                                                               clock: ManualTime) -> None:
    async with Client(f"127.0.0.1:{proxy.port}", timeout=10) as client:
        session = await client.create_session(workspace)
        events = []
        async for event in session.send("go"):
            events.append(event)
            if isinstance(event, ev.ToolCallStarted) and event.call.call_id == "c_wait":
                clock.advance(10 * codelane.client.RESUME_WITHIN)  # a long call: no event for a long time
                proxy.drop()  # then the connection drops
                (workspace / "go").touch()
    _gap_free(events)
    assert events[-1].stop_reason == "end_turn" and proxy.dropped >= 1


async def test_watch_of_an_idle_session_resumes_a_break(waiting_server: ThreadedServer, proxy: DroppingProxy,
                                                        workspace: Path, clock: ManualTime) -> None:
    (workspace / "go").touch()  # the turn below does not wait
    async with (
        Client(f"127.0.0.1:{proxy.port}", timeout=10) as client,
        Client(waiting_server.address, timeout=10) as direct,
    ):
        session = await client.create_session(workspace)
        watched = []
        async for item in session.watch(follow=True):
            watched.append(item)
            if isinstance(item, ev.CaughtUp):
                clock.advance(10 * codelane.client.RESUME_WITHIN)  # nothing happens for a long time
                proxy.drop()  # then the connection drops (as when the server restarts)
                sent = [e async for e in (await direct.get_session(session.id)).send("go")]
            elif isinstance(item, ev.TurnFinished):
                break
    assert watched == [ev.CaughtUp(0), *sent] and proxy.dropped >= 1


class _Stream:
    """A scripted event stream: yields `replies`, then `then()` runs (the test moves its clock) and
    the stream breaks with `code` (UNAVAILABLE, as a lost connection does)."""

    def __init__(self, replies: list[session_pb2.WatchEventsResponse], then: Callable[[], None],
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "Socket closed") -> None:
        self._replies = replies
        self._then = then
        self._code = code
        self._details = details

    async def _items(self) -> AsyncIterator[session_pb2.WatchEventsResponse]:
        for reply in self._replies:
            yield reply
        self._then()
        raise grpc.aio.AioRpcError(self._code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=self._details)

    def __aiter__(self) -> AsyncIterator[session_pb2.WatchEventsResponse]:
        return self._items()

    def cancel(self) -> bool:
        return True


class _Silent:
    """A stream that never answers nor ends (a server that took the connection and says nothing)
    until it is cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def _items(self) -> AsyncIterator[session_pb2.WatchEventsResponse]:
        await self.cancelled.wait()
        raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata())
        yield  # an async generator

    def __aiter__(self) -> AsyncIterator[session_pb2.WatchEventsResponse]:
        return self._items()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


class _ScriptedSessions:
    """A SessionService stub whose WatchEvents answers with the next scripted stream."""

    def __init__(self, streams: list[_Stream | _Silent]) -> None:
        self._streams = iter(streams)
        self.requests: list[session_pb2.WatchEventsRequest] = []

    def WatchEvents(self, request: session_pb2.WatchEventsRequest, **_: object) -> _Stream | _Silent:
        self.requests.append(request)
        return next(self._streams)


def _scripted_session(streams: list[_Stream | _Silent]) -> tuple[Session, _ScriptedSessions]:
    sessions = _ScriptedSessions(streams)
    client = SimpleNamespace(_sessions=sessions, _metadata=())
    return Session(client, SimpleNamespace(session_id="s_scripted")), sessions  # type: ignore[arg-type]


def _caught_up(last: int) -> session_pb2.WatchEventsResponse:
    return session_pb2.WatchEventsResponse(caught_up=session_pb2.CaughtUp(last_sequence=last))


def _event(sequence: int) -> session_pb2.WatchEventsResponse:
    event = events_pb2.Event(session_id="s_scripted", sequence=sequence, turn_id="t_1",
                             turn_started=events_pb2.TurnStarted(user_text="go"))
    return session_pb2.WatchEventsResponse(events=session_pb2.EventBatch(events=[event]))


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codelane.client, "RESUME_BACKOFF_INITIAL", 0.0)
    monkeypatch.setattr(codelane.client, "RESUME_BACKOFF_MAX", 0.0)


async def test_a_caught_up_marker_starts_the_budget_afresh(clock: ManualTime, no_backoff: None) -> None:
    # An idle session: each stream only says it is caught up, then breaks after a long quiet
    # spell. Each break is a new one (the stream had worked again), each resumed.
    def quiet() -> None:
        clock.advance(10 * codelane.client.RESUME_WITHIN)

    session, sessions = _scripted_session([
        _Stream([_caught_up(0)], quiet), _Stream([_caught_up(0)], quiet), _Stream([_event(1)], quiet),
    ])  # fmt: skip
    watch = session.watch(follow=True)
    assert [await anext(watch), await anext(watch)] == [ev.CaughtUp(0), ev.event_from_proto(_event(1).events.events[0])]
    await watch.aclose()
    assert [r.after_sequence for r in sessions.requests] == [0, 0, 0]


async def test_resumes_that_fail_spend_the_budget_counted_from_the_break(clock: ManualTime,
                                                                          no_backoff: None) -> None:
    # The stream breaks right after an event; every resume fails, each a while later: once the
    # budget is spent since the break, the error is raised.
    def later() -> None:
        clock.advance(0.6 * codelane.client.RESUME_WITHIN)

    session, sessions = _scripted_session([
        _Stream([_event(1)], lambda: None), _Stream([], later), _Stream([], later), _Stream([], later),
    ])  # fmt: skip
    seen = []
    with pytest.raises(CodelaneError) as raised:
        async for item in session.watch(follow=True):
            seen.append(item)
    assert raised.value.code == "UNAVAILABLE"
    assert [e.sequence for e in seen] == [1]
    assert [r.after_sequence for r in sessions.requests] == [0, 1, 1]  # two resumes; the second broke past the budget


async def test_a_resume_cancelled_by_a_stopping_server_is_resumed_again(no_backoff: None) -> None:
    # A server stopping (SIGTERM) ends its following streams with UNAVAILABLE SHUTTING_DOWN; a
    # resume made at once reached it while its gRPC server stopped, which cancels the calls it
    # has not started (CANCELLED, from the server: a call this client cancels raises
    # asyncio.CancelledError instead). That error was raised, where the restarted server was
    # there to resume on.
    session, sessions = _scripted_session([
        _Stream([_event(1)], lambda: None, details="the server is shutting down"),
        _Stream([], lambda: None, grpc.StatusCode.CANCELLED, "CANCELLED"),
        _Stream([_caught_up(1), _event(2)], lambda: None),
    ])  # fmt: skip
    watch = session.watch(follow=True)
    seen = [await anext(watch), await anext(watch), await anext(watch)]
    await watch.aclose()
    assert [getattr(item, "sequence", None) for item in seen] == [1, None, 2]
    assert [r.after_sequence for r in sessions.requests] == [0, 1, 1]


async def test_a_resumed_stream_that_never_answers_is_given_up_once_the_budget_is_spent(
    monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    # A server that takes the connection and says nothing (its handlers hung): the resumed
    # stream waited for ever, past any budget.
    monkeypatch.setattr(codelane.client, "RESUME_WITHIN", 0.3)
    silent = _Silent()
    session, sessions = _scripted_session([_Stream([_event(1)], lambda: None), silent])
    seen = []
    with pytest.raises(CodelaneError) as raised:
        async for item in session.watch(follow=True):
            seen.append(item)
    assert raised.value.code == "UNAVAILABLE" and "no reply from the server" in raised.value.message
    # Why the stream broke in the first place is not hidden by the silence after it (a server
    # that said it was shutting down, then went quiet while it restarted).
    assert raised.value.message.endswith("since the event stream broke (UNAVAILABLE: Socket closed)")
    assert [e.sequence for e in seen] == [1]
    assert [r.after_sequence for r in sessions.requests] == [0, 1] and silent.cancelled.is_set()


async def test_a_watch_resuming_when_the_client_is_closed_raises_cancelled(
    unused_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Closed while it waited to resume, it made its next WatchEvents on the closed channel and
    # raised gRPC's own UsageError, where a call running at close raises CodelaneError CANCELLED.
    caplog.set_level(logging.INFO, logger="codelane.client")
    monkeypatch.setattr(codelane.client, "RESUME_BACKOFF_INITIAL", 60.0)  # it waits there till closed
    client = Client(f"127.0.0.1:{unused_port}", timeout=10)  # nothing listens: every stream breaks
    session = Session(client, SimpleNamespace(session_id="s_closed"))  # type: ignore[arg-type]
    watch = asyncio.ensure_future(anext(session.watch(follow=True)))
    await poll_until(lambda: len(_resumes(caplog)) >= 2, what="a second resume, then its pause")
    await client.close()
    with pytest.raises(CodelaneError) as raised:
        await watch
    assert raised.value.code == "CANCELLED"


# -- a stream the SDK cannot resume, as the CLI reports it ------------------------------------------
#
# The commands run in this process, so the SDK's budget is the test's: a clock on which each look
# takes a whole budget spends it within two resumes, however fast the machine is. The proxy is
# closed once the stream has shown something: the connection had worked, then every resume is
# refused.


class _Shown(io.StringIO):
    """A stdout that sets `seen` once a line with `marker` is written."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._marker = marker
        self.seen = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if self._marker in self.getvalue():
            self.seen.set()
        return written


@pytest.fixture
def hasty_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    looks = itertools.count(step=codelane.client.RESUME_WITHIN)
    monkeypatch.setattr(codelane.client, "_clock", lambda: float(next(looks)))
    monkeypatch.setattr(codelane.client, "RESUME_BACKOFF_INITIAL", 0.0)
    monkeypatch.setattr(codelane.client, "RESUME_BACKOFF_MAX", 0.0)


def _run_in_process(main: Callable[[list[str]], int], argv: list[str], marker: str, proxy: DroppingProxy,
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs a CLI command's main here, closing the proxy once `marker` is on its stdout; returns
    its exit code, stdout and stderr."""
    shown = _Shown(marker)
    monkeypatch.setattr(sys, "stdout", shown)
    monkeypatch.setenv("CODELANE_CONFIG", os.devnull)

    def close_when_shown() -> None:
        if shown.seen.wait(CLI_TIMEOUT):
            proxy.close()

    closer = threading.Thread(target=close_when_shown, daemon=True)
    closer.start()
    try:
        code = main(argv)
    finally:
        shown.seen.set()
        closer.join(CLI_TIMEOUT)
    return code, shown.getvalue(), capsys.readouterr().err


def test_run_that_loses_its_stream_mid_turn_says_how_to_watch_on(
    waiting_server: ThreadedServer, proxy: DroppingProxy, workspace: Path, hasty_budget: None,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from codelane.commands import run

    address = f"127.0.0.1:{proxy.port}"
    code, out, err = _run_in_process(run.main, ["--server", address, "--workspace", str(workspace), "--json", "go"],
                                     '"tool_call_started"', proxy, monkeypatch, capsys)
    (workspace / "go").touch()  # the turn goes on, and ends
    events = json_lines(out)
    last, session = events[-1]["sequence"], events[-1]["session_id"]
    assert code == 1 and events[-1]["kind"] != "turn_finished"
    assert err.count("\n") == 1
    assert err.startswith(f"codelane run: lost the connection to {address} after sequence {last} (UNAVAILABLE")
    assert err.endswith(f"; the turn goes on: `codelane watch --server {address} {session} --after {last}`\n")
    assert "--tls-ca" not in err and "nothing listens" not in err


def test_watch_that_loses_its_stream_says_how_to_watch_on(
    waiting_server: ThreadedServer, proxy: DroppingProxy, workspace: Path, hasty_budget: None,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from codelane.commands import watch

    (workspace / "go").touch()  # the turn does not wait
    with SyncClient(waiting_server.address, timeout=10) as client:
        session = client.create_session(workspace)
        last = list(session.send("go"))[-1].sequence
    address = f"127.0.0.1:{proxy.port}"
    code, out, err = _run_in_process(watch.main, ["--server", address, "--after", "2", "--json", session.id],
                                     '"caught_up"', proxy, monkeypatch, capsys)
    assert code == 1 and json_lines(out)[-1] == {"kind": "caught_up", "last_sequence": last}
    assert err.count("\n") == 1
    assert err.startswith(f"codelane watch: lost the connection to {address} after sequence {last} (UNAVAILABLE")
    assert err.endswith(f"; the session goes on: `codelane watch --server {address} {session.id} --after {last}`\n")
    assert "--tls-ca" not in err and "nothing listens" not in err
