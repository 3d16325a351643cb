"""`codelane run`: --json, --plain, the live view off a terminal, Ctrl-C, and errors."""

from __future__ import annotations

import contextlib
import http.server
import os
import pty
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codelane import events as ev
from codelane.sync import Client
from tests.cli.conftest import CLI_TIMEOUT, ThreadedServer, call, cli, cli_env, json_lines, write_script
from tests.polling import wait_until
from tests.processes import pids_with


def test_run_json_is_one_event_per_line_in_order(server: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", server.address, "--workspace", str(workspace), "--json", "fix it")
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "turn_started" and kinds[-1] == "turn_finished"
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["stop_reason"] == "end_turn"
    assert kinds.count("tool_call_started") == kinds.count("tool_call_finished") == 5
    assert kinds.count("model_responded") == 3
    # Each call starts before it finishes, and every call of a step ends before the step's response.
    for call_id in ("c_grep", "c_read", "c_missing", "c_edit", "c_reread"):
        started = next(i for i, e in enumerate(events) if e["kind"] == "tool_call_started"
                       and e["call"]["call_id"] == call_id)
        finished = next(i for i, e in enumerate(events) if e.get("call_id") == call_id)
        assert started < finished
    # Every call of a step ends before the next step shows up (its text or its response).
    second_step = next(i for i, e in enumerate(events) if e.get("step") == 1)
    assert {e["call_id"] for e in events[:second_step] if e["kind"] == "tool_call_finished"} == {
        "c_grep", "c_read", "c_missing"}
    assert len({e["session_id"] for e in events}) == 1
    assert (workspace / "a.txt").read_text() == "new content\n"


def test_run_plain_prints_one_line_per_event(server: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", server.address, "--workspace", str(workspace), "--plain", "fix it")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("session s_") and str(workspace) in lines[0]
    assert "turn started: 'fix it'" in lines[1]
    assert any("-> grep" in line and "on local" in line for line in lines)
    assert any("<- read" in line and " error " in line for line in lines)  # the missing file
    assert any("model: Done." in line for line in lines)
    assert "turn finished: end_turn, 3 model request(s), 5 tool call(s)" in lines[-1]


def test_run_defaults_to_plain_off_a_terminal(server: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", server.address, "--workspace", str(workspace), "fix it")
    assert out.returncode == 0, out.stderr
    assert "turn finished: end_turn, 3 model request(s)" in out.stdout.splitlines()[-1]


def test_run_live_view_off_a_terminal(server: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", server.address, "--workspace", str(workspace), "--live", "fix it")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\x1b[" not in text  # rich sees a pipe: no colours, no cursor movement
    assert "> fix it" in text and "Looking around." in text and "Done." in text
    # Each step's final table stays: header, one row per call, final statuses.
    assert text.count("tool") >= 2 and "duration" in text and "arguments" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["grep", "query", "local", "ok", "1"] in [r[:5] for r in rows]
    assert ["read", "query", "local", "error", "1"] in [r[:5] for r in rows]
    assert ["edit", "execute", "local", "ok", "1"] in [r[:5] for r in rows]
    summary = text.splitlines()[-1] if text.splitlines()[-1].strip() else text.splitlines()[-2]
    assert "turn finished: end_turn" in text and "5 tool call(s) (1 failed)" in text, summary


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_run_ctrl_c_or_sigterm_cancels_the_turn_and_exits_128_and_the_signal(
    make_server, tmp_path: Path, workspace: Path, mark: str, stop: signal.Signals, code: int
) -> None:
    # SIGTERM (`timeout 60 codelane run ...`) killed the CLI and left its turn running: a call
    # waiting for a confirmation kept the session busy, and its next turn was TURN_IN_PROGRESS.
    model = write_script(tmp_path / "slow.json", [
        {"text": "Waiting.", "tool_calls": [call("bash", "c_sleep", command=f"sleep {mark}")]},
        {"text": "Never reached."},
    ])  # fmt: skip
    server = make_server()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "run", "--server", server.address, "--workspace", str(workspace),
         "--model", model, "--json", "wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []  # read line by line: each readline waits for the next line (pytest-timeout bounds it)
        while '"tool_call_started"' not in (lines[-1] if lines else ""):
            line = proc.stdout.readline()
            assert line, f"codelane run ended early: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == code, err
    # The sleep never ends on its own: the cancelled turn ended it.
    wait_until(lambda: not pids_with(mark), what="the cancelled call's sleep to end", within=CLI_TIMEOUT)
    assert "interrupted; the turn was cancelled" in err and "Traceback" not in err
    session_id = json_lines(lines[0])[0]["session_id"]
    with Client(server.address, timeout=10) as client:
        session = client.get_session(session_id)
        finished = [e for e in session.watch(follow=False) if isinstance(e, ev.TurnFinished)]
    assert [f.stop_reason for f in finished] == ["cancelled"]


def test_run_reports_an_unreachable_server_in_one_line(unused_port: int, workspace: Path) -> None:
    out = cli("run", "--server", f"127.0.0.1:{unused_port}", "--workspace", str(workspace), "hi")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"codelane run: nothing listens at 127.0.0.1:{unused_port} (connection refused, "
                          "UNAVAILABLE): is `codelane server` running there?\n")


def test_run_embedded_needs_no_server(model: str, workspace: Path) -> None:
    out = cli("run", "--embedded", "--workers", "1", "--workspace", str(workspace), "--model", model, "--json", "go")
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    assert events[-1]["kind"] == "turn_finished" and events[-1]["stop_reason"] == "end_turn"
    assert any(e["kind"] == "tool_call_started" and e["worker_id"] == "local-1" for e in events)


@contextlib.contextmanager
def _on_a_terminal(*args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`codelane ARGS...` with stdin on a pseudo-terminal and its output piped: the process, and
    the terminal's end to type into."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "codelane.cli", *args], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def _lines_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """stdout's lines up to the first holding `marker`, read line by line: each readline waits for
    the next line (pytest-timeout bounds it)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or marker not in lines[-1]:
        line = proc.stdout.readline()
        assert line, f"codelane ended early: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line)
    return lines


def _run_with_a_terminal_stdin(server: ThreadedServer, workspace: Path, model: str, answer: bytes) -> tuple[
        list[dict], str]:
    """`codelane run --ask bash --json` with stdin on a pseudo-terminal; types `answer` at the prompt."""
    with _on_a_terminal("run", "--server", server.address, "--workspace", str(workspace), "--model", model,
                        "--ask", "bash", "--json", "go") as (proc, master):
        lines = _lines_until(proc, '"confirmation_required"')
        os.write(master, answer)
        rest, err = proc.communicate(timeout=CLI_TIMEOUT)
    return json_lines("".join(lines) + rest), err


def test_run_asks_for_confirmation_on_a_terminal(make_server, tmp_path: Path, workspace: Path) -> None:
    model = write_script(tmp_path / "ask.json", [
        {"text": "Running.", "tool_calls": [call("bash", "c_echo", command="echo confirmed")]},
        {"text": "Done."},
    ])  # fmt: skip
    server = make_server()
    events, err = _run_with_a_terminal_stdin(server, workspace, model, b"y\n")
    assert "allow bash" in err and "[y/N]" in err and "Traceback" not in err
    kinds = [e["kind"] for e in events]
    assert kinds.index("confirmation_required") < kinds.index("confirmation_resolved") < kinds.index(
        "tool_call_finished")
    resolved = next(e for e in events if e["kind"] == "confirmation_resolved")
    assert resolved["call_id"] == "c_echo" and resolved["outcome"] == "approved"
    finished = next(e for e in events if e["kind"] == "tool_call_finished")
    assert finished["result"]["output"].strip() == "confirmed" and not finished["result"]["is_error"]

    refused, _ = _run_with_a_terminal_stdin(server, workspace, model, b"n\n")
    resolved = next(e for e in refused if e["kind"] == "confirmation_resolved")
    assert resolved["outcome"] == "rejected"
    finished = next(e for e in refused if e["kind"] == "tool_call_finished")
    assert finished["result"]["is_error"] and "confirmed" not in finished["result"]["output"]


def test_run_without_a_terminal_prints_the_command_that_answers(make_server, tmp_path: Path,
                                                                 workspace: Path) -> None:
    model = write_script(tmp_path / "ask.json", [
        {"text": "Running.", "tool_calls": [call("bash", "c_echo", command="echo confirmed")]},
        {"text": "Done."},
    ])  # fmt: skip
    server = make_server()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "run", "--server", server.address, "--workspace", str(workspace),
         "--model", model, "--ask", "bash", "--plain", "go"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        hint = proc.stderr.readline()  # the run can ask nobody: it says how to answer, then waits
        assert "bash {\"command\": \"echo confirmed\"} waits for a confirmation (rule ask[0] `bash`)" in hint
        command = hint.split("Answer it with: ", 1)[1].split("  (or --reject)")[0]
        session_id = proc.stdout.readline().split()[1]
        assert command == f"codelane confirm --server {server.address} {session_id} c_echo --approve"
        answered = cli(*shlex.split(command)[1:])  # from a second process, as printed
        assert answered.returncode == 0, answered.stderr
        assert answered.stdout == f"call c_echo of session {session_id}: approved\n"
        # Read through the pipes' buffers (communicate() would skip what readline() buffered).
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and err == ""
    assert "confirmation required: bash" in rest and "confirmation of c_echo: approved" in rest
    assert "turn finished: end_turn" in rest.splitlines()[-1]


def test_run_sandbox_flags_set_the_session_policy(tmp_path: Path, workspace: Path) -> None:
    script = write_script(tmp_path / "sandbox.yaml", [
        {"text": "Trying.", "tool_calls": [
            call("bash", "c_env", command="printenv PROJECT_MODE"),
            call("bash", "c_write", command="echo changed > a.txt"),
        ]},
        {"text": "Done."},
    ])  # fmt: skip
    out = cli("run", "--embedded", "--local-workers", "0", "--model", script, "--workspace", str(workspace), "--json",
              "--sandbox", "read-only", "--env", "PROJECT_MODE=ci", "go")
    assert out.returncode == 0, out.stderr
    results = {e["call_id"]: e["result"] for e in json_lines(out.stdout) if e["kind"] == "tool_call_finished"}
    assert results["c_env"]["output"] == "ci"
    assert "Read-only file system" in results["c_write"]["output"]
    assert (workspace / "a.txt").read_text() != "changed\n"
    refused = cli("run", "--embedded", "--local-workers", "0", "--workspace", str(workspace),
                  "--env", "no-equals", "go")
    assert refused.returncode == 2 and "NAME=VALUE" in refused.stderr


def test_run_in_a_busy_session_names_the_commands_that_wait_or_cancel(make_server, tmp_path: Path,
                                                                      workspace: Path) -> None:
    # The server's message gives an API user's advice (CancelTurn); the CLI user gets commands.
    server = make_server(model=write_script(tmp_path / "waiting.json", [
        {"text": "Waiting.", "tool_calls": [call("bash", "c_wait", command="while [ ! -e go ]; do sleep 0.05; done")]},
        {"text": "Done."},
    ]))  # fmt: skip
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)
        turn = session.send("wait")  # started at once
        wait_until(lambda: session.refresh().state == "running", what="the first turn to run")
        out = cli("run", "--server", server.address, "--session", session.id, "--plain", "again")
        (workspace / "go").touch()
        assert list(turn)[-1].stop_reason == "end_turn"
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr == (f"codelane run: session {session.id} is already running a turn (FAILED_PRECONDITION): "
                          f"wait for it to end (follow it with `codelane watch --server {server.address} "
                          f"{session.id}`) or cancel it with `codelane cancel --server {server.address} "
                          f"{session.id}`\n")


def test_chat_off_a_terminal_prints_only_the_turns(server: ThreadedServer, workspace: Path) -> None:
    # Lines read from a pipe or a file need no prompt: `you> ` went to stdout, before each turn's
    # first line and as a last line of its own.
    out = subprocess.run(
        [sys.executable, "-m", "codelane.cli", "chat", "--server", server.address, "--workspace", str(workspace),
         "--plain"],
        input="fix it\n", capture_output=True, text=True, timeout=CLI_TIMEOUT, env=cli_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "turn started: 'fix it'" in lines[0] and "turn finished: end_turn" in lines[-1]
    assert all(line.startswith(("[", " ")) for line in lines), out.stdout


def test_chat_whose_reader_leaves_stops_quietly(server: ThreadedServer, workspace: Path) -> None:
    # `codelane chat < questions | head -1`: the next line written raised BrokenPipeError, a traceback.
    proc = subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "chat", "--server", server.address, "--workspace", str(workspace),
         "--plain"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write("fix it\n")
        proc.stdin.flush()
        assert "turn started" in proc.stdout.readline()
        proc.stdout.close()  # the reader leaves: what chat writes from now on has nowhere to go
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write("and again\n")  # a second turn, written after the reader left
            proc.stdin.close()
        err = proc.stderr.read()
        proc.wait(CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1


def test_chat_into_a_pipe_prompts_on_stderr(server: ThreadedServer, workspace: Path) -> None:
    # `codelane chat | tee transcript`: input() wrote `you> ` to stdout, into the transcript.
    with _on_a_terminal("chat", "--server", server.address, "--workspace", str(workspace), "--plain") as (proc, master):
        os.write(master, b"fix it\n")
        lines = _lines_until(proc, "turn finished")
        os.write(master, b"\x04")  # Ctrl-D: leave
        rest, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, err
    assert "turn started: 'fix it'" in lines[0] and rest == ""
    assert all(line.startswith(("[", " ")) for line in lines), lines
    assert err.count("you> ") == 2  # before the line typed, then before the Ctrl-D


def test_run_says_on_stderr_why_a_turn_failed(make_server, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exit 1 with nothing on stderr: a script that reads stdout as JSON had no reason to show.
    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b'{"error": {"message": "model gpt-x does not exist", "type": "invalid_request_error"}}'
            self.send_response(400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    model_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=model_server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{model_server.server_address[1]}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        server = make_server()
        out = cli("run", "--server", server.address, "--workspace", str(workspace), "--model", "openai:gpt-x",
                  "--json", "go")
    finally:
        model_server.shutdown()
    assert out.returncode == 1
    assert json_lines(out.stdout)[-1]["kind"] == "turn_finished"
    assert out.stderr == ("codelane run: the turn ended with error (BAD_REQUEST: OpenAI API error 400 "
                          "(invalid_request_error): model gpt-x does not exist)\n"), out.stderr
