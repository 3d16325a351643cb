"""`--log-format json`: a server process and a worker process write one JSON object per line, and
the lines written for a turn and a call carry the session, turn, call, worker and trace ids."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from codelane.v1 import events_pb2, session_pb2, session_pb2_grpc
from session_server.api.grpc_logs import GRPC_LOGGER
from session_server.llm.script import Script
from tests.cli.conftest import cli
from tests.ops.conftest import OtlpReceiver, Workers, scrape
from tests.polling import poll_until
from tests.session import conftest as session_fixtures
from tests.session.conftest import (
    InProcess,
    Processes,
    call,
    kind,
    mock_llm,
    read_rest,
    read_until,
    scripted,
    write_script,
)
from tool_worker.telemetry import logs as log_context
from tool_worker.worker import EXIT_UNAUTHENTICATED

make_server = session_fixtures.make_server
workspace = session_fixtures.workspace


def _lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in parsed:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    return parsed


async def test_json_logs_name_the_session_turn_call_worker_and_trace(
    processes: Processes, workspace: Path, tmp_path: Path, otlp: OtlpReceiver, worker_procs: Workers
) -> None:
    # c2 names no tool: it never runs, and ends in the turn's task rather than one of its own.
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("sleep", "c1", ms=1), call("no_such_tool", "c2")]},
                                {"text": "Done."}])
    server = await processes.start_server(
        tmp_path / "data", model=model, local_workers=0,
        args=("--log-format", "json", "--log-level", "DEBUG", "--otlp-endpoint", otlp.endpoint),
    )
    worker_procs.spawn(f"127.0.0.1:{server.port}", "w1", "--log-format", "json", "--log-level", "DEBUG",
                       "--otlp-endpoint", otlp.endpoint)
    await server.client.wait_workers("w1")
    session = await server.client.create(workspace)
    events = await server.client.send(session.session_id, "go")
    turn_id = events[-1].turn_id

    def server_logs() -> list[dict]:
        return _lines(server.err.read_text(errors="replace"))

    await poll_until(lambda: any(e["message"].startswith("turn ended") for e in server_logs()), what="the turn's log")
    logs = server_logs()
    turn = next(e for e in logs if e["message"].startswith("turn ended"))
    assert turn["session_id"] == session.session_id and turn["turn_id"] == turn_id
    assert len(turn["trace_id"]) == 32 and "call_id" not in turn
    tool = next(e for e in logs if e["message"].startswith("call c1 (sleep) ok on w1"))
    assert (tool["session_id"], tool["turn_id"], tool["call_id"], tool["trace_id"]) == (
        session.session_id, turn_id, "c1", turn["trace_id"])
    never_ran = next(e for e in logs if e["message"].startswith("call c2 (no_such_tool) unknown_tool"))
    assert (never_ran["session_id"], never_ran["turn_id"], never_ran["call_id"]) == (session.session_id, turn_id, "c2")
    hub = next(e for e in logs if "worker w1 connected" in e["message"])
    assert hub["worker_id"] == "w1" and "session_id" not in hub

    await poll_until(lambda: "call ran" in worker_procs.log("w1"), what="the worker's log of the call")
    ran = next(e for e in _lines(worker_procs.log("w1")) if e["message"].startswith("call ran"))
    assert (ran["worker_id"], ran["session_id"], ran["call_id"], ran["trace_id"]) == (
        "w1", session.session_id, "c1", turn["trace_id"])


async def test_a_client_leaving_its_event_streams_is_one_info_line_each_not_a_traceback(
    make_server, workspace: Path, tmp_path: Path, caplog
) -> None:
    # grpc.aio logged "ExecuteBatchError raised in core by servicer method" at ERROR, with a
    # traceback, for every stream a client cancelled while its events were being written.
    caplog.set_level(logging.INFO, logger=GRPC_LOGGER)
    server: InProcess = await make_server()
    (workspace / "big.txt").write_text(("y" * 1900 + "\n") * 120)
    reads = [call("read", f"c{i}", file_path="big.txt") for i in range(32)]
    session = await server.client.create(workspace, scripted(tmp_path, [{"text": "", "tool_calls": reads},
                                                                        {"text": "done"}]))
    await server.client.send(session.session_id, "go")
    request = session_pb2.WatchEventsRequest(session_id=session.session_id, after_sequence=0, follow=True)
    metrics = server.server.metrics.registry
    admission = server.server.admission

    def pages_read() -> float:
        return metrics.get_sample_value("codelane_event_replay_page_chars_count") or 0.0

    def left_while_written() -> bool:
        return any("a client left while its stream was being written" in r.getMessage()
                   for r in caplog.records if r.name == GRPC_LOGGER)

    # Without BDP probing the client's window stays at 64 KiB: a stream that read its first page
    # (a message of megabytes) is writing it, and stays so, since nothing here reads. Whether
    # gRPC's core fails that write or drops it quietly when the call is cancelled is its own
    # race: rounds of 8 streams until one is seen (one round nearly always; 1 in 60 needed two).
    for _ in range(5):
        before = pages_read()
        async with grpc.aio.insecure_channel(server.server.address,
                                             options=[("grpc.http2.bdp_probe", 0)]) as channel:
            sessions = session_pb2_grpc.SessionServiceStub(channel)
            streams = [sessions.WatchEvents(request) for _ in range(8)]
            await poll_until(lambda before=before: pages_read() >= before + 8,
                             what="each stream to read its first page and write it")
            for stream in streams:
                stream.cancel()
            await poll_until(lambda: admission.subscribers == 0, what="the streams to end on the server")
        if left_while_written():
            break

    grpc_records = [r for r in caplog.records if r.name == GRPC_LOGGER]
    assert not [r for r in grpc_records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert left_while_written()


async def test_a_name_in_a_text_log_line_cannot_start_a_line_of_its_own(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # A workspace entry the snapshot leaves out is named in a warning; its name is anybody's who
    # can write the repository (or the model, through bash).
    forged = "2026-12-07 06:15:00,000 codelane.server ERROR forged line"
    os.mkfifo(workspace / f"x\n{forged}")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("grep", "c1", pattern="needle")]}, {"text": "Done."}])
    server = await processes.start_server(tmp_path / "data", model=model, local_workers=1)
    await server.client.wait_workers("local-1")
    session = await server.client.create(workspace)
    await server.client.send(session.session_id, "go")

    def warned() -> str:
        return next((line for line in server.err.read_text(errors="replace").splitlines()
                     if "left out of its snapshot" in line), "")

    await poll_until(warned, what="the warning naming the left-out entry")
    assert f"x\\n{forged}" in warned()
    assert not any(line.startswith(forged) for line in server.err.read_text(errors="replace").splitlines())


async def test_a_default_model_without_its_api_key_is_said_at_start(processes: Processes, tmp_path: Path) -> None:
    # The server started without a word, and the first turn was where a missing key showed.
    server = await processes.start_server(tmp_path / "data", model="anthropic:claude-sonnet-4-5", local_workers=0)
    assert ("the default model anthropic:claude-sonnet-4-5 needs $ANTHROPIC_API_KEY, which is not set"
            in server.log()), server.log()
    # A base URL of its own (a proxy, a local server) may need no key: nothing is said.
    proxied = await processes.start_server(tmp_path / "data2", model="openai:gpt-4o", local_workers=0,
                                           env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    keyed = await processes.start_server(tmp_path / "data3", model="openai:gpt-4o", local_workers=0,
                                         env={"OPENAI_API_KEY": "sk-test"})
    assert "needs $" not in proxied.log() + keyed.log()


async def test_json_logs_stay_json_when_a_server_or_worker_cannot_start(
    processes: Processes, tmp_path: Path, worker_procs: Workers
) -> None:
    # The line a failed start exits with was printed as `codelane server: ...` whatever the
    # format: a log pipeline reading one object per line met plain text at the moment that
    # mattered most.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli("server", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
                   "--local-workers", "0", "--log-format", "json", timeout=60)
    assert busy.returncode == 1, busy
    said = _lines(busy.stderr)
    assert [(e["level"], e["prog"]) for e in said] == [("ERROR", "codelane server")], busy.stderr
    assert said[0]["message"].startswith(f"cannot listen on 127.0.0.1:{port}: the address is in use")

    server = await processes.start_server(tmp_path / "data", local_workers=0, args=("--worker-token", "w-secret"))
    worker = worker_procs.spawn(f"127.0.0.1:{server.port}", "w1", "--log-format", "json")
    assert worker.wait(60) == EXIT_UNAUTHENTICATED
    refused = _lines(worker_procs.log("w1"))[-1]
    assert (refused["level"], refused["prog"], refused["worker_id"]) == ("ERROR", "codelane worker", "w1")
    assert refused["message"].startswith("the hub refused our token (UNAUTHENTICATED)")


def test_a_renamed_option_is_said_in_the_log_format(tmp_path: Path) -> None:
    # Said as a plain line while the arguments were parsed, before the format was known.
    out = cli("server", "--workers", "0", "--scripts-dir", str(tmp_path / "missing"), "--log-format", "json",
              "--data-dir", str(tmp_path / "data"), timeout=60)
    assert out.returncode == 2, out
    said = _lines(out.stderr)
    assert [(e["level"], e["prog"]) for e in said] == [("WARNING", "codelane server"), ("ERROR", "codelane server")]
    assert said[0]["message"] == "--workers is deprecated: use --local-workers"


def _run_logging(program: str) -> tuple[int, list[dict]]:
    """`program` run by a new Python; its exit code and the JSON objects it wrote to stderr."""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    return out.returncode, _lines(out.stderr)


def test_json_logs_carry_an_uncaught_error_as_one_object(tmp_path: Path) -> None:
    # Python's own hook printed the traceback of an error no code caught as lines of text.
    program = ("from tool_worker.telemetry.logs import configure_logging\n"
               "configure_logging('INFO', 'json', '')\n"
               "raise RuntimeError('no code caught this')\n")
    returncode, [said] = _run_logging(program)
    assert returncode == 1
    assert said["level"] == "CRITICAL" and said["message"] == "uncaught RuntimeError: no code caught this"
    assert "Traceback" in said["exc_info"]


def test_json_logs_carry_an_error_uncaught_in_a_thread_as_one_object() -> None:
    # The store's and the semantic index's threads: threading's own hook printed lines of text.
    program = ("import threading\n"
               "from tool_worker.telemetry.logs import configure_logging\n"
               "configure_logging('INFO', 'json', '')\n"
               "def fail():\n"
               "    raise RuntimeError('no code caught this')\n"
               "thread = threading.Thread(target=fail, name='checkpoints')\n"
               "thread.start()\n"
               "thread.join()\n")
    returncode, [said] = _run_logging(program)
    assert returncode == 0
    assert said["level"] == "CRITICAL", said
    assert said["message"] == "uncaught RuntimeError in checkpoints: no code caught this"
    assert "Traceback" in said["exc_info"]



async def test_a_turn_ended_by_a_model_error_names_its_kind(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    # "turn ended: error after ..." was all the log said of each turn of a server whose model
    # key was wrong (or whose provider failed): why showed only in the session's events.
    caplog.set_level(logging.INFO, logger="codelane.turns")
    script = Script.load(write_script(tmp_path, [{"text": "Looking."}], name="mid.yaml"))
    async with mock_llm(monkeypatch, script, fault="error_mid_stream", fault_count=1):
        server: InProcess = await make_server()
        session = await server.client.create(workspace, "openai:mock")
        events = await server.client.send(session.session_id, "go")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_ERROR
    reason = next(e.error.reason for e in events if kind(e) == "error")
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("turn ended")]
    assert len(ended) == 1 and ended[0].startswith(f"turn ended: error ({reason}) after"), ended


async def test_bytes_that_are_not_http_on_the_metrics_port_are_no_error(
    processes: Processes, tmp_path: Path
) -> None:
    # The metrics port takes no token: aiohttp logged each request it could not parse at ERROR
    # with a traceback, so anyone who reached it wrote an error per connection into the log.
    server = await processes.start_server(tmp_path / "data", local_workers=0, args=(
        "--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "INFO"))
    port = int(server.out.read_text().split("metrics on port ")[1].split()[0])
    for request in (b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        try:
            assert (await reader.read()).split(b" ")[1].startswith(b"4")  # answered only once logged
        except ConnectionResetError:
            # On Python 3.12+ aiohttp answers within the read that found the error (an eagerly
            # started task) and closes with the rest of the oversized header still unread: the
            # kernel then resets the connection, which may discard the answer. A reset comes from
            # that close, after the log line too.
            assert len(request) > 65_536  # only the oversized header leaves bytes unread
        writer.close()
    assert "codelane_serving" in (await scrape(port)).text
    logs = _lines(server.err.read_text(errors="replace"))
    assert not [e for e in logs if e["level"] in ("WARNING", "ERROR", "CRITICAL") or "exc_info" in e], logs


async def test_every_json_line_of_a_worker_names_it(
    processes: Processes, tmp_path: Path, worker_procs: Workers
) -> None:
    # The worker's lines outside its connection (its drain on SIGTERM) carried no worker_id: a
    # server's local workers write into its stderr, which of them drained was not said.
    server = await processes.start_server(tmp_path / "data", local_workers=0)
    worker = worker_procs.spawn(f"127.0.0.1:{server.port}", "w1", "--log-format", "json")
    await server.client.wait_workers("w1")
    assert worker_procs.stop(worker) == 0
    logs = _lines(worker_procs.log("w1"))
    assert any(e["message"].startswith("SIGTERM: draining") for e in logs), logs
    assert all(e.get("worker_id") == "w1" for e in logs), logs


async def test_json_lines_about_a_session_or_worker_written_outside_it_carry_its_ids(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    # A turn cancelled by a client, a local worker that died: lines written by the RPC or the
    # server's supervisor, not inside the turn or the worker's stream, named the session or the
    # worker in their message only, and a search on session_id or worker_id missed them.
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "b1", command="true")]}, {"text": "ok"}])
    server = await processes.start_server(tmp_path / "data", local_workers=1,
                                          args=("--log-format", "json", "--log-level", "INFO"))
    await server.client.wait_workers("local-1")
    session = await server.client.create(workspace, model, permissions=session_pb2.PermissionPolicy(ask=["bash"]))
    stream = server.client.send_stream(session.session_id, "go")
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", [])
    assert await server.client.cancel(session.session_id)
    turn_id = (await read_rest(stream))[-1].event.turn_id
    worker = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                  and f"--parent-pid\0{server.pid}\0" in _cmdline(pid) and "\0local-1\0" in _cmdline(pid))
    os.kill(worker, signal.SIGKILL)

    def logged(start: str) -> dict | None:
        return next((e for e in _lines(server.err.read_text(errors="replace")) if e["message"].startswith(start)), None)

    cancelled = await poll_until(lambda: logged(f"session {session.session_id}: turn"), what="the cancel's line")
    assert "cancelled by a client" in cancelled["message"]
    assert (cancelled["session_id"], cancelled["turn_id"]) == (session.session_id, turn_id)
    died = await poll_until(lambda: logged("local worker local-1 was killed by SIGKILL"), what="the worker's death")
    assert died["worker_id"] == "local-1"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def test_repeats_tells_a_standing_condition_once_and_anything_new_at_once() -> None:
    # One thing remembered (the worker's): returning to an earlier one is news again.
    last = log_context.Repeats(60.0)
    assert [last.lately(k) for k in ("a", "a", "b", "a")] == [False, True, False, False]
    last.forget()
    assert last.lately("a") is False
    # Several remembered (the hub's refusals): past the capacity, the oldest is news again.
    several = log_context.Repeats(60.0, capacity=2)
    assert [several.lately(k) for k in ("a", "b", "a", "c", "b", "a")] == [False, False, True, False, True, False]
    # A zero interval remembers nothing.
    assert [log_context.Repeats(0.0).lately("a") for _ in range(2)] == [False, False]
