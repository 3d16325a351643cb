"""Control from any terminal: continuing sessions, show, delete, health, version, completion, and
the local workers a server keeps running."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from codelane import __version__
from codelane import events as ev
from codelane.sync import Client
from codelane.v1 import session_pb2, session_pb2_grpc, tools_pb2
from tests.cli.conftest import CLI_TIMEOUT, ThreadedServer, cli, cli_env, json_lines, write_script
from tests.polling import wait_until

SESSION_LINE = re.compile(r"^session (s_[0-9a-f]+) ")


def _session_of(plain_output: str) -> str:
    match = SESSION_LINE.match(plain_output)
    assert match, plain_output
    return match.group(1)


def test_run_takes_the_session_options_of_the_sdk(server: ThreadedServer, workspace: Path) -> None:
    out = cli("run", "--server", server.address, "--workspace", str(workspace), "--plain", "--system-prompt",
              "Be brief.", "--max-turns", "7", "--max-output-tokens", "4096", "--query-concurrency", "3",
              "--label", "team=tools", "--label", "ticket=T-1", "--lane", "query=hybrid", "--deny", "bash(rm *)",
              "--default-action", "allow", "--confirmation-timeout", "12", "fix it")
    assert out.returncode == 0, out.stderr
    with Client(server.address, timeout=10) as client:
        info = client.get_session(_session_of(out.stdout)).info
    assert info.labels == {"team": "tools", "ticket": "T-1"}
    listed = json_lines(cli("sessions", "--server", server.address, "--json").stdout)
    assert [row["session_id"] for row in listed] == [info.session_id]
    with grpc.insecure_channel(server.address) as channel:  # the whole config, as the server keeps it
        reply = session_pb2_grpc.SessionServiceStub(channel).GetSession(
            session_pb2.GetSessionRequest(session_id=info.session_id), timeout=10)
    cfg = reply.session.config
    assert (cfg.system_prompt, cfg.max_turns, cfg.queue.query_concurrency) == ("Be brief.", 7, 3)
    assert cfg.max_output_tokens == 4096
    assert list(cfg.permissions.deny) == ["bash(rm *)"] and cfg.permissions.confirmation_timeout.seconds == 12
    assert cfg.permissions.default_action == session_pb2.PERMISSION_ACTION_ALLOW
    assert (tools_pb2.LANE_QUERY, tools_pb2.LANE_MODE_HYBRID) in [(lane.lane, lane.mode) for lane in cfg.queue.lanes]


def test_run_continues_a_session(make_server, tmp_path: Path, workspace: Path) -> None:
    server = make_server(model=write_script(tmp_path / "s.json", [{"text": "One."}, {"text": "Two."},
                                                                   {"text": "Three."}]))
    first = cli("run", "--server", server.address, "--workspace", str(workspace), "--plain", "hi")
    session_id = _session_of(first.stdout)
    again = cli("run", "--server", server.address, "--session", session_id, "--plain", "again")
    assert again.returncode == 0 and _session_of(again.stdout) == session_id and "model: Two." in again.stdout
    other = tmp_path / "other"
    other.mkdir()
    cli("run", "--server", server.address, "--workspace", str(other), "--plain", "elsewhere")  # a newer session
    last = cli("run", "--server", server.address, "--workspace", str(workspace), "--continue", "--plain", "more")
    assert last.returncode == 0 and _session_of(last.stdout) == session_id and "model: Three." in last.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    none = cli("run", "--server", server.address, "--workspace", str(empty), "--continue", "x")
    assert none.returncode == 1 and none.stderr == (f"codelane run: NOT_FOUND: no session of {empty} on "
                                                    f"{server.address} to continue: start one without --continue\n")
    unknown = cli("run", "--server", server.address, "--session", "s_nope", "x")
    assert unknown.returncode == 1 and unknown.stderr.startswith("codelane run: NOT_FOUND: ")
    assert unknown.stderr.endswith("(see `codelane sessions`)\n")


def test_show_folds_tool_results_and_delete_removes_sessions(server: ThreadedServer, workspace: Path) -> None:
    run = cli("run", "--server", server.address, "--workspace", str(workspace), "--plain", "fix it")
    session_id = _session_of(run.stdout)
    shown = cli("show", "--server", server.address, session_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"session {session_id} · {workspace} · ") and "9 message(s)" in lines[0]
    text = shown.stdout
    assert "you>\n    fix it\n" in text and "model>\n    Looking around.\n" in text
    assert '    -> read {"file_path": "src/alpha.py"}  [c_read]' in lines
    assert "    <- read ok: 1\tdef alpha():  (+1 lines)  [c_read]" in lines  # folded to its first line
    assert any(line.startswith("    <- read error (tool_error): ") and "[c_missing]" in line for line in lines)
    full = cli("show", "--server", server.address, "--full", session_id).stdout
    assert "return 'needle-alpha'" in full and "return 'needle-alpha'" not in text
    as_json = json_lines(cli("show", "--server", server.address, "--json", session_id).stdout)
    assert as_json[0]["session_id"] == session_id and [m["role"] for m in as_json[1:]][:2] == ["user", "assistant"]

    deleted = cli("delete", "--server", server.address, session_id, "s_missing")
    assert deleted.returncode == 1
    assert deleted.stdout == f"session {session_id} deleted\n"
    assert deleted.stderr.startswith("codelane delete: NOT_FOUND: ") and "s_missing" in deleted.stderr
    assert cli("show", "--server", server.address, session_id).returncode == 1


HOSTILE = "title\x1b]0;pwned\x07 red\x1b[31m [bold]kept[/bold] c1\x9b2J cr\rover"
SHOWN = "title\\x1b]0;pwned\\x07 red\\x1b[31m [bold]kept[/bold] c1\\x9b2J cr\\rover"


def _hostile_session(make_server, tmp_path: Path) -> tuple[ThreadedServer, str, Path]:
    """A session whose workspace's name, model text and read file hold escape sequences and markup."""
    workspace = tmp_path / "ws\x1b]0;pwned\x07 [red]kept"
    workspace.mkdir()
    (workspace / "f.txt").write_text(HOSTILE + "\n", encoding="utf-8")
    script = write_script(tmp_path / "hostile.json", [
        {"text": HOSTILE, "tool_calls": [{"name": "read", "id": "c1", "arguments": {"file_path": "f.txt"}}]},
        {"text": "Done."},
    ])
    server = make_server(model=script)
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)
        list(session.send("go"))
    return server, session.id, workspace


def test_show_prints_what_a_session_holds_without_its_escape_sequences(make_server, tmp_path: Path) -> None:
    # A model's text, a file a tool read and a workspace's name reached the terminal raw: the
    # terminal obeyed their escape sequences (its title set, colours, the screen cleared).
    server, session_id, workspace = _hostile_session(make_server, tmp_path)
    for full in ([], ["--full"]):
        out = cli("show", "--server", server.address, *full, session_id)
        assert out.returncode == 0, out.stderr
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out.stdout), out.stdout
        assert SHOWN in out.stdout and "ws\\x1b]0;pwned\\x07 [red]kept" in out.stdout, out.stdout
    # --json is exact: JSON escapes them itself.
    as_json = json_lines(cli("show", "--server", server.address, "--json", session_id).stdout)
    assert as_json[0]["workspace"] == str(workspace) and as_json[2]["text"] == HOSTILE


def test_tables_show_their_cells_as_they_are(make_server, tmp_path: Path) -> None:
    # A workspace's name reached the terminal with its escape sequences, and `[red]` in it was
    # read as a style and dropped: the table named another directory.
    server, session_id, _ = _hostile_session(make_server, tmp_path)
    out = cli("sessions", "--server", server.address)
    assert out.returncode == 0, out.stderr
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out.stdout), out.stdout
    [row] = out.stdout.splitlines()[1:]
    assert row.startswith(f"{session_id}  {tmp_path}/ws\\x1b]0;pwned\\x07 [red]kept  "), row


def test_health_and_version(make_server) -> None:
    server = make_server(token="sekrit")
    health = cli("health", "--server", server.address)
    assert health.returncode == 0, health.stderr
    assert health.stdout.splitlines() == [
        f"{server.address}: SERVING",
        "  codelane.v1.SessionService: SERVING",
        "  codelane.v1.WorkerHubService: SERVING",
        "  codelane.v1.AdminService: SERVING",
        "  workers: unknown (the server wants a token)",
    ]
    with_token = json.loads(cli("health", "--server", server.address, "--token", "sekrit", "--json").stdout)
    assert with_token["healthy"] is True and with_token["workers"] == 0

    version = cli("version", "--server", server.address, "--token", "sekrit")
    assert version.returncode == 0, version.stderr
    client_line, server_line = version.stdout.splitlines()
    assert client_line == f"client: codelane {__version__}"
    assert server_line.startswith(f"server: codelane {__version__} at {server.address}, up since ")
    refused = cli("version", "--server", server.address)
    assert refused.returncode == 1 and refused.stdout == f"client: codelane {__version__}\n"
    assert "refused the token" in refused.stderr


def test_completion_scripts_know_every_subcommand_and_option() -> None:
    from codelane.cli import SUBCOMMANDS

    bash = cli("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    for name in SUBCOMMANDS:
        assert name in bash.stdout
    options = ("--session", "--continue", "--approve", "--profile", "--local-workers", "--subscriber-buffer",
               "--sandbox")
    for option in options:
        assert option in bash.stdout
    checked = subprocess.run(["bash", "-n"], input=bash.stdout, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr  # valid bash
    zsh = cli("completion", "zsh")
    assert zsh.returncode == 0 and "#compdef codelane" in zsh.stdout


def test_completion_whose_reader_left_stops_quietly() -> None:
    # `codelane completion zsh | head -3`: the write into a pipe nobody reads raised BrokenPipeError,
    # a traceback. The pipe's read end is closed before the command starts, so it always is.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "codelane.cli", "completion", "zsh"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=CLI_TIMEOUT, env=cli_env())
    finally:
        os.close(write_end)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 1


# -- the server's own processes --------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _wait(predicate, what: str) -> None:
    wait_until(predicate, what=what, within=CLI_TIMEOUT, interval=0.05)


def test_a_drained_or_killed_local_worker_is_reaped_and_replaced(
    make_server, workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="codelane.server")
    server = make_server(local_workers=2)
    before = server.server.local_worker_pids()
    with Client(server.address, timeout=10) as client:
        connected_before = max(w.connected for w in client.list_workers())
    assert set(before) == {"local-1", "local-2"}

    drained = cli("drain", "--server", server.address, "local-2")
    assert drained.returncode == 0, drained.stderr
    _wait(lambda: server.server.local_worker_pids().get("local-2") not in (None, before["local-2"]),
          "a new local-2 process")
    _wait(lambda: _state(before["local-2"]) is None, "the drained worker to be reaped (not left a zombie)")
    with Client(server.address, timeout=10) as client:
        _wait(lambda: any(w.worker_id == "local-2" and not w.draining and w.connected > connected_before
                          for w in client.list_workers()), "the new local-2 to connect")
    # An operator's drain is no fault (the worker exits 0): it was a WARNING, as a crash is.
    levels = [r.levelname for r in caplog.records if r.getMessage().startswith("local worker local-2 exited with 0;")]
    assert levels == ["INFO"], levels

    os.kill(before["local-1"], 9)  # a crash
    _wait(lambda: server.server.local_worker_pids().get("local-1") not in (None, before["local-1"]),
          "a new local-1 process")
    _wait(lambda: _state(before["local-1"]) is None, "the killed worker to be reaped")
    with Client(server.address, timeout=10) as client:
        events = list(client.create_session(workspace).send("fix it"))
    assert events[-1].stop_reason == "end_turn"
    assert {e.worker_id for e in events if isinstance(e, ev.ToolCallStarted) and e.lane == "query"} <= {
        "local-1", "local-2", "local"}


def _server(tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    """`codelane server` on a free loopback port, its stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "codelane.cli", "server", "--listen", "127.0.0.1:0", "--data-dir",
         str(tmp_path / "data"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env(),
    )  # fmt: skip


def test_the_server_says_listening_once(tmp_path: Path) -> None:
    proc = _server(tmp_path, "--local-workers", "1")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert re.fullmatch(r"codelane server listening on 127\.0\.0\.1:\d+\n", first), first
        with Client(first.split()[-1], timeout=10) as client:
            _wait(lambda: len(client.list_workers()) == 1, "the local worker")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert "listening" not in out + err  # once, and only on stdout
    assert proc.returncode == 0


def test_the_server_says_the_port_of_each_listen(tmp_path: Path) -> None:
    # A second --listen of port 0 (a LAN address for workers, say) got a free port nobody was told.
    proc = _server(tmp_path, "--local-workers", "0", "--listen", "127.0.0.2:0", "--health-listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert re.fullmatch(r"codelane server listening on 127\.0\.0\.1:\d+\n", first), first
        second = proc.stdout.readline()
        assert re.fullmatch(r"codelane server also listening on 127\.0\.0\.2:\d+\n", second), second
        assert proc.stdout.readline().startswith("codelane server health on port ")  # in that order
        with Client(second.split()[-1], timeout=10) as client:
            assert client.health() == "SERVING"
    finally:
        proc.terminate()
        proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 0


def test_the_server_takes_the_old_workers_spelling(tmp_path: Path) -> None:
    proc = _server(tmp_path, "--workers", "1")
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stderr.readline() == "codelane server: --workers is deprecated: use --local-workers\n"
        address = proc.stdout.readline().split()[-1]
        with Client(address, timeout=10) as client:
            _wait(lambda: len(client.list_workers()) == 1, "the local worker --workers 1 asked for")
    finally:
        proc.terminate()
        proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 0


def test_a_worker_says_it_connected(server: ThreadedServer) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "codelane.cli", "worker", "--connect", server.address, "--id", "w9"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.strip().endswith(f"worker INFO connected to {server.address} as w9"), line
    finally:
        proc.terminate()
        proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 0
