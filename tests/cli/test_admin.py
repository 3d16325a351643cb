"""`codelane sessions`, `workers`, `stats`, `drain`, and how every client command reports errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codelane.sync import Client
from tests.cli.conftest import ThreadedServer, cli, cli_env, json_lines
from tests.polling import wait_until


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """A plain (piped) table: its header cells and its rows' cells."""
    lines = [line.split() for line in text.splitlines()]
    return lines[0], lines[1:]


def test_sessions_lists_newest_first(server: ThreadedServer, workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with Client(server.address, timeout=10) as client:
        first = client.create_session(workspace)
        turn = list(first.send("fix it"))
        second = client.create_session(other, labels={"team": "x"})
    out = cli("sessions", "--server", server.address)
    assert out.returncode == 0, out.stderr
    header, rows = _table(out.stdout)
    assert header == ["ID", "WORKSPACE", "MODEL", "STATE", "EVENTS", "MESSAGES", "CREATED"]
    assert [r[0] for r in rows] == [second.id, first.id]
    assert rows[1][1:6] == [str(workspace), first.info.model, "idle", str(turn[-1].sequence), "9"]
    assert rows[0][1:6] == [str(other), second.info.model, "idle", "0", "0"]
    assert len(rows[0]) == 8  # CREATED is a date and a time

    limited = cli("sessions", "--server", server.address, "--limit", "1", "--json")
    assert limited.returncode == 0, limited.stderr
    [only] = json_lines(limited.stdout)
    assert only["session_id"] == second.id and only["labels"] == {"team": "x"}


def test_sessions_of_a_relative_workspace(server: ThreadedServer, workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with Client(server.address, timeout=10) as client:
        mine = client.create_session(workspace)
        client.create_session(tmp_path / "other")
    # As run and chat take it: relative to the current directory, not to the server's.
    out = cli("sessions", "--server", server.address, "--workspace", ".", "--json", cwd=workspace)
    assert out.returncode == 0, out.stderr
    assert [s["session_id"] for s in json_lines(out.stdout)] == [mine.id]


def test_sessions_on_an_empty_server(server: ThreadedServer) -> None:
    out = cli("sessions", "--server", server.address)
    assert out.returncode == 0 and out.stdout == f"no sessions on {server.address}\n"


def test_server_and_token_come_from_the_environment(make_server, workspace: Path) -> None:
    server = make_server(token="sekrit")
    refused = cli("sessions", env=cli_env(CODELANE_SERVER=server.address))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"codelane sessions: the server at {server.address} refused the token")
    assert "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr
    assert cli("sessions", "--token", "sekrit", env=cli_env(CODELANE_SERVER=server.address)).returncode == 0
    ok = cli("sessions", env=cli_env(CODELANE_SERVER=server.address, CODELANE_TOKEN="sekrit"))
    assert ok.returncode == 0 and ok.stdout.startswith("no sessions"), ok.stderr


def test_workers_stats_and_drain(make_server, workspace: Path) -> None:
    server = make_server(local_workers=2)
    with Client(server.address, timeout=10) as client:
        turn = list(client.create_session(workspace).send("fix it"))
    assert turn[-1].stop_reason == "end_turn"

    out = cli("workers", "--server", server.address)
    assert out.returncode == 0, out.stderr
    header, rows = _table(out.stdout)
    assert header == ["ID", "HOST", "LABELS", "TOOLS", "SLOTS", "IN-FLIGHT", "STATE", "WORKSPACES"]
    assert sorted(r[0] for r in rows) == ["local-1", "local-2"]
    for row in rows:
        assert row[2] == "-" and "read" in row[3].split(",") and "bash" not in row[3].split(",")
        assert row[4:7] == ["4", "0", "ready"]
        # Local workers read the server's own files; the snapshot they saw, by its hash.
        assert row[7] == f"{workspace}:" and row[8] == "shared" and row[9].startswith("@") and len(row) == 10
    as_json = json_lines(cli("workers", "--server", server.address, "--json").stdout)
    assert {w["worker_id"] for w in as_json} == {"local-1", "local-2"}
    shown = {row[0]: row[9][1:] for row in rows}
    for worker in as_json:
        held = worker["workspaces"][str(workspace)]
        assert held["visible"] and held["mode"] == "shared" and held["snapshot"].startswith(shown[worker["worker_id"]])

    stats = cli("stats", "--server", server.address)
    assert stats.returncode == 0, stats.stderr
    header, rows = _table(stats.stdout)
    assert header == ["LANE", "PENDING", "ACTIVE", "COMPLETED", "FAILED", "P50", "P90", "P99"]
    by_lane = {r[0]: r for r in rows}
    assert by_lane["query"][1:5] == ["0", "0", "3", "1"]  # the read of a missing file failed
    assert by_lane["execute"][1:5] == ["0", "0", "1", "0"]
    assert by_lane["generate"][1:5] == ["0", "0", "3", "0"]
    assert all(cell.endswith("ms") for cell in by_lane["query"][5:])
    lanes = json_lines(cli("stats", "--server", server.address, "--json").stdout)
    assert {lane["lane"] for lane in lanes} == {"query", "execute", "generate"}

    connected = {w["worker_id"]: w["connected"] for w in as_json}
    drained = cli("drain", "--server", server.address, "--reason", "maintenance", "local-2")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.startswith("worker local-2 is draining")

    def replaced() -> dict[str, dict] | None:  # an idle worker drains at once and leaves; another local-2 starts
        now = {w["worker_id"]: w for w in json_lines(cli("workers", "--server", server.address, "--json").stdout)}
        fresh = now.get("local-2")
        return now if fresh and fresh["connected"] > connected["local-2"] and not fresh["draining"] else None

    now = wait_until(replaced, what="a new local-2 in place of the drained one", within=20, interval=0.1)
    assert now["local-1"]["connected"] == connected["local-1"]  # the other one was left alone

    unknown = cli("drain", "--server", server.address, "nobody")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == ("codelane drain: NOT_FOUND: no worker 'nobody' is connected (see `codelane workers`)\n")


def test_workers_on_a_server_without_workers(server: ThreadedServer) -> None:
    out = cli("workers", "--server", server.address)
    assert out.returncode == 0 and out.stdout == f"no workers connected to {server.address}\n"


@pytest.mark.parametrize("command", [
    ["sessions"], ["workers"], ["stats"], ["drain", "local-1"], ["watch", "s_1"],
    ["run", "--workspace", ".", "hi"],
])  # fmt: skip
def test_unreachable_server_is_one_line_and_exit_1(command: list[str], unused_port: int) -> None:
    address = f"127.0.0.1:{unused_port}"
    out = cli(command[0], "--server", address, *command[1:], timeout=30)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"codelane {command[0]}: nothing listens at {address} (connection refused, UNAVAILABLE): "
                          "is `codelane server` running there?\n")


def test_a_port_that_is_not_the_api_says_so(make_server) -> None:
    server = make_server(health_listen="127.0.0.1:0")
    health = f"127.0.0.1:{server.server.health_port}"
    out = cli("sessions", "--server", health)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"codelane sessions: {health} answers gRPC but not codelane's API (UNIMPLEMENTED: Method "
                          "not found!): is it a server's --health-listen port, or another service? Give the address "
                          "the server listens on (--listen)\n")


def test_sessions_json_is_parseable(server: ThreadedServer, workspace: Path) -> None:
    with Client(server.address, timeout=10) as client:
        client.create_session(workspace)
    out = cli("sessions", "--server", server.address, "--json")
    [info] = [json.loads(line) for line in out.stdout.splitlines()]
    assert info["workspace"] == str(workspace) and info["state"] == "idle"


def test_error_lines_say_what_to_do() -> None:
    from codelane.client import CodelaneError
    from codelane.commands.common import error_line
    from codelane.commands.config import Connection

    connection = Connection(server="10.0.0.1:50051")
    assert error_line("codelane stats", CodelaneError("DEADLINE_EXCEEDED", "Deadline Exceeded"), connection) == (
        "codelane stats: the server at 10.0.0.1:50051 did not answer within 10s (DEADLINE_EXCEEDED): is it a "
        "codelane server, and is it overloaded?")
    assert error_line("codelane run", CodelaneError("INVALID_ARGUMENT", "bad\nrule  'x'"), connection) == (
        "codelane run: INVALID_ARGUMENT: bad rule 'x'")  # always one line


def test_client_commands_speak_tls(make_server, tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    address = f"localhost:{server.port}"
    ok = cli("sessions", "--server", address, "--tls-ca", str(cert))
    assert ok.returncode == 0 and ok.stdout.startswith("no sessions"), ok.stderr
    plain = cli("sessions", "--server", address)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and plain.stderr.startswith("codelane sessions:")
