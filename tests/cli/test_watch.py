"""`codelane watch`: replay after a sequence, caught_up, following live events, errors."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from codelane import events as ev
from codelane.sync import Client
from tests.cli.conftest import CLI_TIMEOUT, ThreadedServer, cli, cli_env, json_lines


def _one_turn(server: ThreadedServer, workspace: Path) -> tuple[str, list[ev.Event]]:
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)
        return session.id, list(session.send("fix it"))


def test_watch_after_n_no_follow_json_prints_the_rest_then_caught_up(server: ThreadedServer, workspace: Path) -> None:
    session_id, events = _one_turn(server, workspace)
    last = events[-1].sequence
    out = cli("watch", "--server", server.address, "--after", "5", "--no-follow", "--json", session_id)
    assert out.returncode == 0, out.stderr
    printed = json_lines(out.stdout)
    assert [e["sequence"] for e in printed[:-1]] == list(range(6, last + 1))
    assert [e["kind"] for e in printed[:-1]] == [e.kind for e in events[5:]]
    assert printed[-1] == {"kind": "caught_up", "last_sequence": last}


def test_watch_replays_everything_in_plain_lines(server: ThreadedServer, workspace: Path) -> None:
    session_id, events = _one_turn(server, workspace)
    out = cli("watch", "--server", server.address, "--no-follow", session_id)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "turn started: 'fix it'" in lines[0]
    assert "turn finished: end_turn" in lines[-2]
    assert lines[-1] == f"[----] caught up at sequence {events[-1].sequence}"


def test_watch_after_the_last_event_prints_only_caught_up(server: ThreadedServer, workspace: Path) -> None:
    session_id, events = _one_turn(server, workspace)
    out = cli("watch", "--server", server.address, "--after", str(events[-1].sequence), "--no-follow", "--json",
              session_id)
    assert out.returncode == 0, out.stderr
    assert json_lines(out.stdout) == [{"kind": "caught_up", "last_sequence": events[-1].sequence}]


def test_watch_follows_a_new_turn_until_ctrl_c(server: ThreadedServer, workspace: Path) -> None:
    session_id, events = _one_turn(server, workspace)
    proc = subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "watch", "--server", server.address, "--after",
         str(events[-1].sequence), "--json", session_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env(),
    )  # fmt: skip
    printed_lines: queue.Queue[str] = queue.Queue()  # every line the watch prints; "" once it ends

    def read_lines() -> None:
        for line in iter(proc.stdout.readline, ""):
            printed_lines.put(line)
        printed_lines.put("")

    threading.Thread(target=read_lines, daemon=True).start()
    lines: list[str] = []

    def next_line() -> str:
        line = printed_lines.get(timeout=CLI_TIMEOUT)
        assert line, f"codelane watch ended early: {proc.stderr.read()}"
        lines.append(line)
        return line

    try:
        next_line()  # caught up: now following
        with Client(server.address, timeout=10) as client:
            second = list(client.get_session(session_id).send("again"))
        while '"turn_finished"' not in next_line():
            pass
        proc.send_signal(signal.SIGINT)
        proc.wait(CLI_TIMEOUT)
        err = proc.stderr.read()
        while line := printed_lines.get(timeout=CLI_TIMEOUT):  # anything printed after, up to the end
            lines.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    assert proc.returncode == 130 and "Traceback" not in err, err
    printed = json_lines("".join(lines))
    assert printed[0] == {"kind": "caught_up", "last_sequence": events[-1].sequence}
    assert [e["sequence"] for e in printed[1:]] == [e.sequence for e in second]


def test_watch_unknown_session_is_one_line_with_not_found(server: ThreadedServer) -> None:
    out = cli("watch", "--server", server.address, "--no-follow", "s_nope")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("codelane watch: NOT_FOUND: ") and "s_nope" in out.stderr


def test_watch_rejects_a_negative_after(server: ThreadedServer) -> None:
    out = cli("watch", "--server", server.address, "--after", "-1", "s_x")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--after" in out.stderr


def test_watch_after_beyond_the_last_event_names_the_flag(server: ThreadedServer, workspace: Path) -> None:
    session_id, events = _one_turn(server, workspace)
    last = events[-1].sequence
    out = cli("watch", "--server", server.address, "--after", str(last + 5), "--no-follow", session_id)
    # The server's message names the request field (after_sequence); the CLI user gave --after.
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"codelane watch: --after is beyond the session's last event, {last} (OUT_OF_RANGE): "
                          f"give at most {last}\n")
