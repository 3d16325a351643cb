"""Event streams that break are resumed by the SDK, with no event missed or repeated: a server
with a one-event subscriber buffer cuts every reader that is not instantly there, a proxy drops
connections mid-turn, and a server killed and restarted mid-turn drops the connection."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from codelane import events as ev
from codelane.client import Client
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
from tests.polling import wait_until

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
    from codelane.sync import Client as SyncClient

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
def proxy(make_server, tmp_path: Path):
    """A server with the default buffer, reached through a proxy whose connections the test drops."""
    server = make_server(model=write_script(tmp_path / "waiting.json", WAITING))
    proxy = DroppingProxy(server.port)
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
