"""The CLI driven as a person drives it: in a real pseudo-terminal (pexpect), with the live view,
Ctrl-C and Ctrl-D, and a second process answering or cancelling from another terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect
import pytest

from codelane import events as ev
from codelane.sync import Client
from tests.cli.conftest import CLI_TIMEOUT, ThreadedServer, call, cli, cli_env, write_script

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
SESSION = re.compile(r"session (s_[0-9a-f]+)")
CTRL_C, CTRL_D = "\x03", "\x04"
# Starts the CLI as the leader of a new session whose controlling terminal is its stdin (the pty),
# so that Ctrl-C typed there reaches it as SIGINT. The test process is never forked: gRPC's
# threads in it do not survive a fork(), while subprocess starts children with vfork and exec.
_LAUNCH = ("import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
ROWS, COLUMNS = 50, 200


class Terminal:
    """A CLI process in a pseudo-terminal, and what it has shown so far as plain text: colours and
    cursor moves stripped, so the live view's frames read as the lines a person sees."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "-m", "codelane.cli", *args], stdin=slave, stdout=slave,
                stderr=slave, env=cli_env(TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS)),
            )  # fmt: skip
        finally:
            os.close(slave)
        self.child = pexpect.fdpexpect.fdspawn(master, encoding="utf-8", timeout=CLI_TIMEOUT)
        self.text = ""  # everything shown, stripped
        self._pending = ""  # the start of an escape sequence cut by a read
        self._pos = 0  # where the next wait_for looks from

    def type(self, text: str) -> None:
        """Types `text`: a line needs its "\\n"; Ctrl-C is CTRL_C, Ctrl-D CTRL_D."""
        self.child.send(text)

    def _read(self, timeout: float) -> None:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=timeout)
        except OSError:  # EIO: the process is gone and the pty closed
            raise pexpect.EOF("the terminal closed") from None
        self._pending += chunk
        cut = self._pending.rfind("\x1b")
        if cut != -1 and ANSI.match(self._pending, cut) is None:
            done, self._pending = self._pending[:cut], self._pending[cut:]
        else:
            done, self._pending = self._pending, ""
        self.text += ANSI.sub("", done)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """Waits until the terminal shows `pattern` (a regex) after what earlier waits matched."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + CLI_TIMEOUT
        while (match := regex.search(self.text, self._pos)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the terminal did not show {pattern!r}; it shows:\n{self.text[-3000:]}")
            try:
                self._read(left)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                raise AssertionError(f"the process ended before showing {pattern!r}:\n{self.text[-3000:]}") from None
        self._pos = match.end()
        return match

    def last_table_before(self, match: re.Match[str]) -> str:
        """The tool-call table printed last before `match` (from its header on)."""
        return self.text[self.text.rfind("tool ", 0, match.start()):match.start()]

    def exit_status(self) -> int:
        deadline = time.monotonic() + CLI_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self._read(deadline - time.monotonic())
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                break
        return self.proc.wait(CLI_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(CLI_TIMEOUT)
        self.child.close()


def _turns(server: ThreadedServer, session_id: str) -> list[ev.TurnFinished]:
    with Client(server.address, timeout=10) as client:
        events = client.get_session(session_id).watch(follow=False)
        return [e for e in events if isinstance(e, ev.TurnFinished)]


@pytest.fixture
def chat_server(make_server, tmp_path: Path, mark: str) -> ThreadedServer:
    # The script answers by the number of assistant messages so far: the cancelled turn leaves one.
    # The second turn's sleep never ends on its own: only the cancel ends it.
    model = write_script(tmp_path / "chat.json", [
        {"text": "First answer."},
        {"text": "Working on it.", "tool_calls": [call("bash", "c_sleep", command=f"sleep {mark}")]},
        {"text": "Third answer."},
    ])  # fmt: skip
    return make_server(model=model)


def test_chat_of_three_turns_with_a_ctrl_c_in_the_second(chat_server: ThreadedServer, workspace: Path) -> None:
    term = Terminal("chat", "--server", chat_server.address, "--workspace", str(workspace))
    try:
        session_id = term.wait_for(SESSION.pattern).group(1)
        term.wait_for("you> ")

        term.type("hello\n")
        term.wait_for("First answer.")
        term.wait_for("turn finished: end_turn")
        term.wait_for("you> ")

        term.type("sleep please\n")
        term.wait_for(r"bash\s+execute\s+\S+\s+running")  # the live table, while the call runs
        term.type(CTRL_C)  # cancels the turn; the chat goes on
        finished = term.wait_for("turn finished: cancelled")
        # The step's last table, printed for good, shows how the call ended, not how it was at Ctrl-C.
        last_table = term.last_table_before(finished)
        assert re.search(r"bash\s+execute\s+\S+\s+cancelled", last_table), last_table
        term.wait_for("interrupted; the turn was cancelled")
        term.wait_for("you> ")

        term.type("and now?\n")
        term.wait_for("Third answer.")
        term.wait_for("turn finished: end_turn")
        term.wait_for("you> ")

        term.type(CTRL_D)  # leaves
        term.wait_for(f"left session {session_id}; continue it with: codelane chat --server "
                      f"{re.escape(chat_server.address)} --session {session_id}")
        assert term.exit_status() == 0
    finally:
        term.close()
    assert [t.stop_reason for t in _turns(chat_server, session_id)] == ["end_turn", "cancelled", "end_turn"]


def test_a_confirmation_asked_here_is_answered_from_a_second_process(make_server, tmp_path: Path,
                                                                       workspace: Path) -> None:
    model = write_script(tmp_path / "ask.json", [
        {"text": "Running.", "tool_calls": [call("bash", "c_echo", command="echo confirmed")]},
        {"text": "Done."},
    ])  # fmt: skip
    server = make_server(model=model)
    term = Terminal("run", "--server", server.address, "--workspace", str(workspace), "--ask", "bash", "go")
    try:
        session_id = term.wait_for(SESSION.pattern).group(1)
        term.wait_for(r'allow bash \{"command": "echo confirmed"\}\? \(rule ask\[0\] `bash`\), answer by '
                      r"\d\d:\d\d:\d\d \[y/N\] ")
        answered = cli("confirm", "--server", server.address, session_id, "c_echo", "--approve")
        assert answered.returncode == 0, answered.stderr
        # The question goes away by itself: nobody has to type anything here.
        term.wait_for("confirmation of c_echo: approved")
        term.wait_for("turn finished: end_turn")
        assert term.exit_status() == 0
    finally:
        term.close()
    with Client(server.address, timeout=10) as client:
        results = [m.tool_result for m in client.get_session(session_id).messages() if m.role == "tool"]
    assert [r.output.strip() for r in results] == ["confirmed"]


def test_a_turn_cancelled_from_a_second_process(chat_server: ThreadedServer, workspace: Path) -> None:
    with Client(chat_server.address, timeout=10) as client:
        session = client.create_session(workspace)
        list(session.send("hello"))  # the first answer: the next turn sleeps
    term = Terminal("run", "--server", chat_server.address, "--session", session.id, "sleep please")
    try:
        term.wait_for(r"bash\s+execute\s+\S+\s+running")
        cancelled = cli("cancel", "--server", chat_server.address, session.id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout == f"session {session.id}: the running turn was cancelled\n"
        finished = term.wait_for("turn finished: cancelled")
        last_table = term.last_table_before(finished)
        assert re.search(r"bash\s+execute\s+\S+\s+cancelled", last_table), last_table
        assert term.exit_status() == 1  # the turn did not end well
    finally:
        term.close()
    assert [t.stop_reason for t in _turns(chat_server, session.id)] == ["end_turn", "cancelled"]
    again = cli("cancel", "--server", chat_server.address, session.id)
    assert again.returncode == 0 and again.stdout == f"session {session.id}: no turn was running\n"
