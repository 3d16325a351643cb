"""/metrics of a real server and a real worker process, scraped during and after turns, checked
against what the turns' events say; and a real Prometheus (Debian's `prometheus`) scraping them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from codelane.v1 import admin_pb2, events_pb2, tools_pb2
from session_server.llm.script import Script
from tests.ops.conftest import WAIT, Workers, free_port, scrape, scrape_until
from tests.polling import poll_until
from tests.session.conftest import call, collect, kind, mock_llm, read_until, scripted, write_script

SLEEP_MS = 60_000  # calls that would outlive the test: the turn is cancelled once it has been looked at


def _finished(events: list[events_pb2.Event]) -> list[events_pb2.ToolCallFinished]:
    return [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]


def _outcome(result: tools_pb2.ToolResult) -> str:
    if not result.is_error:
        return "ok"
    return tools_pb2.ErrorKind.Name(result.error_kind).removeprefix("ERROR_KIND_").lower()


async def test_a_turns_figures_match_its_events_during_and_after_it(
    make_server, workspace: Path, tmp_path: Path, worker_procs: Workers
) -> None:
    # Both calls on the worker, the small read too: its metrics are half of what is checked.
    server = await make_server(metrics_listen="127.0.0.1:0", local_cheap_calls=False)
    port = server.server.metrics_port
    worker_procs.spawn(server.server.address, "w1", "--metrics-listen", "127.0.0.1:0")
    worker_metrics = await worker_procs.port("w1", "metrics")
    await server.client.wait_workers("w1")
    model = scripted(tmp_path, [
        {"text": "Looking.", "tool_calls": [call("grep", "g1", pattern="needle"), call("read", "r1", file_path="a.txt"),
                                            call("no_such_tool", "u1")]},
        {"text": "Found it."},
        # The next turn: three long calls on a worker with one slot: one runs, two wait for it.
        {"text": "Sleeping.", "tool_calls": [call("sleep", f"s{i}", ms=SLEEP_MS) for i in range(3)]},
    ])
    session = await server.client.create(workspace, model)
    sid = session.session_id

    # A whole turn: every figure the turn's events can be compared with.
    turn1 = await server.client.send(sid, "find the needle")
    finished = _finished(turn1)
    end = turn1[-1].turn_finished
    page = await scrape(port)
    for f in finished:
        lane = "query" if f.tool_name != "no_such_tool" else "none"
        tool = f.tool_name if f.tool_name != "no_such_tool" else "_unknown_"
        assert page.value("codelane_tool_calls_total", lane=lane, tool=tool, outcome=_outcome(f.result)) == 1
    assert page.value("codelane_tool_calls_total", lane="none", tool="_unknown_", outcome="unknown_tool") == 1
    for tool in ("grep", "read"):
        result = next(f for f in finished if f.tool_name == tool).result
        run_time = result.run_time.seconds + result.run_time.nanos / 1e9
        assert page.value("codelane_tool_call_run_seconds_count", lane="query", tool=tool) == 1
        assert page.value("codelane_tool_call_run_seconds_sum", lane="query", tool=tool) == pytest.approx(
            run_time, abs=1e-6)
    assert page.value("codelane_turns_total", stop_reason="end_turn") == 1
    assert page.value("codelane_turn_duration_seconds_count", stop_reason="end_turn") == 1
    assert page.value("codelane_model_requests_total", provider="scripted", status="ok") == end.model_requests == 2
    assert page.value("codelane_model_input_tokens_total", provider="scripted") == end.usage.input_tokens > 0
    assert page.value("codelane_model_output_tokens_total", provider="scripted") == end.usage.output_tokens > 0
    assert page.value("codelane_events_appended_total") == turn1[-1].sequence == len(turn1)
    assert page.value("codelane_events_delivered_total") >= len(turn1)
    assert page.value("grpc_server_handled_total", grpc_type="server_stream", grpc_service="codelane.v1.SessionService",
                      grpc_method="SendMessage", grpc_code="OK") == 1
    assert page.value("grpc_server_handled_total", grpc_type="unary", grpc_service="codelane.v1.SessionService",
                      grpc_method="CreateSession", grpc_code="OK") == 1
    assert page.value("codelane_workers", labels="", state="ready") == 1
    assert page.value("codelane_worker_slots", labels="") == 1
    worker_page = await scrape_until(
        worker_metrics, lambda p: p.total("codelane_worker_calls_total") == 2, "the worker's two calls")
    assert worker_page.value("codelane_worker_calls_total", tool="grep", outcome="ok") == 1
    assert worker_page.value("codelane_worker_calls_total", tool="read", outcome="ok") == 1
    assert worker_page.value("codelane_worker_connected") == 1
    assert worker_page.value("codelane_worker_placements_total", mode="shared") == 2
    # The worker reported holding the workspace (the server's own path: shared).
    held = await scrape_until(port, lambda p: p.value("codelane_worker_workspaces", mode="shared") == 1,
                              "the worker's holding")
    assert held.value("codelane_worker_workspaces", mode="synced") == 0

    # During a turn: one call runs, two wait for the worker's only slot.
    stream = server.client.send_stream(sid, "now sleep")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", seen)
    page = await scrape_until(
        port, lambda p: p.value("codelane_backlog_calls", lane="query", required_labels="") == 2,
        "two calls waiting for a worker")
    assert page.value("codelane_backlog_oldest_age_seconds", lane="query", required_labels="") > 0
    assert page.value("codelane_worker_calls_in_flight", labels="") == 1
    assert page.value("codelane_turns_running") == 1
    assert page.value("codelane_admission_in_use", limit="max_running_turns") == 1
    assert page.value("codelane_admission_in_use", limit="max_pending_query_calls") == 3
    assert page.value("codelane_event_subscribers") >= 1
    assert page.value("codelane_serving", condition="all") == 1
    worker_page = await scrape(worker_metrics)
    assert worker_page.value("codelane_worker_calls_in_flight") == 1

    assert await server.client.cancel(sid)
    turn2 = [item.event for item in seen] + [item.event for item in await collect(stream)]
    cancelled = _finished(turn2)
    assert len(cancelled) == 3 and all(_outcome(f.result) == "cancelled" for f in cancelled)
    page = await scrape_until(port, lambda p: p.value("codelane_turns_running") == 0, "the turn's end")
    assert page.value("codelane_tool_calls_total", lane="query", tool="sleep", outcome="cancelled") == 3
    assert page.value("codelane_tool_call_queue_wait_seconds_count", lane="query", tool="sleep") == 3
    assert page.value("codelane_turns_total", stop_reason="cancelled") == 1
    assert page.value("codelane_model_requests_total", provider="scripted", status="ok") == 3
    assert page.value("codelane_backlog_calls", lane="query", required_labels="") == 0
    assert page.value("codelane_admission_in_use", limit="max_pending_query_calls") == 0
    assert page.value("codelane_events_appended_total") == turn2[-1].sequence


async def test_backlog_is_kept_per_required_label_set(
    make_server, workspace: Path, tmp_path: Path, worker_procs: Workers
) -> None:
    # gpu_info runs only on workers labelled gpu=true: with the only such worker busy, its calls
    # wait in the backlog of that label set, which is what a GPU worker fleet scales on.
    server = await make_server(metrics_listen="127.0.0.1:0", local_fallback=False)
    worker_procs.spawn(server.server.address, "gpu-1", "--labels", "gpu=true")
    await server.client.wait_workers("gpu-1")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [
        call("sleep", "s1", ms=SLEEP_MS), call("gpu_info", "g1"), call("gpu_info", "g2")]}])
    session = await server.client.create(workspace, model)
    stream = server.client.send_stream(session.session_id, "go")
    try:
        page = await scrape_until(
            server.server.metrics_port,
            lambda p: p.value("codelane_backlog_calls", 0.0, lane="query", required_labels="gpu=true") == 2
            and p.value("codelane_worker_calls_in_flight", labels="gpu=true") == 1,
            "the sleep running, two gpu=true calls waiting")
        assert page.value("codelane_backlog_calls", lane="query", required_labels="") == 0
        assert page.value("codelane_workers", labels="gpu=true", state="ready") == 1
    finally:
        await server.client.cancel(session.session_id)
        await collect(stream)


async def test_a_model_request_that_fails_after_its_first_token_is_in_neither_latency_histogram(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request streams text, then an error event; the next turn's request succeeds.
    # Both histograms are of successful requests: the failed one's time to its first token was
    # counted, so the two counts differed and the first token's quantiles mixed in failures.
    script = Script.load(write_script(tmp_path, [{"text": "Looking."}], name="mid.yaml"))
    async with mock_llm(monkeypatch, script, fault="error_mid_stream", fault_count=1):
        server = await make_server(metrics_listen="127.0.0.1:0")
        session = await server.client.create(workspace, "openai:mock")
        failed = await server.client.send(session.session_id, "go")
        assert failed[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_ERROR
        assert any(kind(e) == "text_delta" for e in failed)  # it failed after its first token
        ok = await server.client.send(session.session_id, "again")
        assert ok[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
        page = await scrape(server.server.metrics_port)
        assert page.total("codelane_model_requests_total", provider="openai") == 2
        assert page.value("codelane_model_requests_total", provider="openai", status="ok") == 1
        assert page.value("codelane_model_request_duration_seconds_count", provider="openai") == 1
        assert page.value("codelane_model_time_to_first_token_seconds_count", provider="openai") == 1


async def test_model_requests_waiting_for_a_generate_slot_are_pending_not_active(
    make_server, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --max-llm-requests 1 and two turns at once: one request runs (the model takes its time),
    # the other waits for the slot. GetQueueStats counted both as running from the start.
    script = Script.load(write_script(tmp_path, [{"text": "Done."}], name="slow.yaml"))
    async with mock_llm(monkeypatch, script) as mock:
        # The model answers nothing until the test has seen both requests: a latency of 1.5 s was
        # the whole window in which to see them, which a loaded machine could miss.
        answer = asyncio.Event()
        stream = mock._stream

        async def held(*args, **kwargs):
            await answer.wait()
            return await stream(*args, **kwargs)

        mock._stream = held
        server = await make_server(max_llm_requests=1)
        sessions = [await server.client.create(workspace, "openai:mock") for _ in range(2)]
        turns = [asyncio.create_task(server.client.send(s.session_id, "go")) for s in sessions]

        async def generate() -> admin_pb2.LaneStats:
            reply = await server.client.admin.GetQueueStats(admin_pb2.GetQueueStatsRequest(), timeout=10)
            return next(lane for lane in reply.lanes if lane.lane == tools_pb2.LANE_GENERATE)

        async def one_runs_one_waits() -> bool:
            lane = await generate()
            return (lane.pending, lane.active) == (1, 1)

        await poll_until(one_runs_one_waits, what="one model request running and one waiting for the slot",
                         within=WAIT, interval=0.05)
        answer.set()
        await asyncio.gather(*turns)
        lane = await generate()
        assert (lane.pending, lane.active, lane.completed, lane.failed) == (0, 0, 2, 0)


def prometheus_tool(name: str) -> str:
    """A binary of Debian's `prometheus` package; CI installs it and sets CODELANE_REQUIRE_PROMETHEUS,
    so there a missing one fails instead of skipping."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CODELANE_REQUIRE_PROMETHEUS"):
            pytest.fail(f"{name} is not installed, and CODELANE_REQUIRE_PROMETHEUS is set (.ci/run installs it)")
        pytest.skip(f"{name} not installed (apt-get install prometheus; .ci/run installs it)")
    return found


def _run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def _start_prometheus(binary: str, promtool: str, tmp_path: Path, port: int,
                      jobs: dict[str, int]) -> subprocess.Popen[bytes]:
    """Prometheus scraping each job's target every second, its config checked by promtool first."""
    config = tmp_path / "prometheus.yml"
    lines = ["global:", "  scrape_interval: 1s", "scrape_configs:"]
    for job, target in jobs.items():
        lines += [f"  - job_name: {job}", f"    static_configs: [{{targets: ['127.0.0.1:{target}']}}]"]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check = _run([promtool, "check", "config", str(config)])
    assert check.returncode == 0, check.stdout + check.stderr
    with (tmp_path / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )


async def _prometheus_query(http: httpx.AsyncClient, base: str, query: str) -> float | None:
    try:
        response = await http.get(f"{base}/api/v1/query", params={"query": query})
    except httpx.TransportError:
        return None  # still starting
    if response.status_code != 200:
        return None  # starting: it answers 503 with a plain-text body until its storage is ready
    result = response.json().get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


async def test_a_real_prometheus_scrapes_the_server_and_a_worker(
    make_server, workspace: Path, tmp_path: Path, worker_procs: Workers
) -> None:
    prometheus_binary, promtool = prometheus_tool("prometheus"), prometheus_tool("promtool")
    server = await make_server(metrics_listen="127.0.0.1:0", local_cheap_calls=False)  # every call on the worker
    worker_procs.spawn(server.server.address, "w1", "--metrics-listen", "127.0.0.1:0")
    worker_metrics = await worker_procs.port("w1", "metrics")
    await server.client.wait_workers("w1")
    web = free_port()
    prometheus = _start_prometheus(
        prometheus_binary, promtool, tmp_path, web,
        {"codelane-server": server.server.metrics_port, "codelane-worker": worker_metrics},
    )
    try:
        model = scripted(tmp_path, [
            {"text": "", "tool_calls": [call("grep", pattern="needle"), call("read", file_path="a.txt")]},
            {"text": "Done."},
        ])
        session = await server.client.create(workspace, model)
        events = await server.client.send(session.session_id, "go")
        assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
        expected = {
            'sum(codelane_tool_calls_total{job="codelane-server",lane="query",outcome="ok"})': 2.0,
            'codelane_turns_total{job="codelane-server",stop_reason="end_turn"}': 1.0,
            'sum(codelane_worker_calls_total{job="codelane-worker",outcome="ok"})': 2.0,
            'codelane_workers{job="codelane-server",state="ready"}': 1.0,
            'up{job="codelane-worker"}': 1.0,
        }
        base = f"http://127.0.0.1:{web}"
        async with httpx.AsyncClient(timeout=5) as http:

            async def scraped() -> bool:
                if prometheus.poll() is not None:
                    text = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"Prometheus exited:\n{text}")
                got = {q: await _prometheus_query(http, base, q) for q in expected}
                return got == expected

            await poll_until(scraped, what=f"Prometheus to answer {expected}", within=WAIT, interval=0.2)
    finally:
        prometheus.terminate()
        prometheus.wait(15)


async def test_the_metrics_page_passes_promtool_lint(make_server, workspace: Path, tmp_path: Path) -> None:
    server = await make_server(metrics_listen="127.0.0.1:0")
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", file_path="a.txt")]}, {"text": "ok"}])
    session = await server.client.create(workspace, model)
    await server.client.send(session.session_id, "go")
    page = await scrape(server.server.metrics_port)
    lint = _run([prometheus_tool("promtool"), "check", "metrics"], page.text)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_bad_metrics_address_is_refused_with_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "codelane.cli", "server", "--data-dir", str(tmp_path / "d"),
            "--metrics-listen", "no-port"]
    result = _run(argv)
    assert result.returncode == 2
    assert "is not HOST:PORT" in result.stderr and "Traceback" not in result.stderr



async def test_a_worker_told_to_pick_its_ports_says_which_it_got() -> None:
    # No hub is listening: the endpoints come first, and the worker keeps trying to connect.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{free_port()}", "--id", "w1",
        "--metrics-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        metrics_line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        health_line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        assert metrics_line.startswith("codelane worker metrics on port "), metrics_line
        assert health_line.startswith("codelane worker health on port "), health_line
        metrics_port, health_port = int(metrics_line.split()[-1]), int(health_line.split()[-1])
        async with httpx.AsyncClient() as client:
            page = await client.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=WAIT)
        assert "codelane_worker_calls_in_flight" in page.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no hub yet
    finally:
        proc.kill()
        await proc.wait()
