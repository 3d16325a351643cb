"""The load test: 200 sessions against a server process whose limits are set below that.

Each round: 200 sessions are asked for where 150 are allowed; 150 event streams where 100 are;
then a turn on each of the 150 sessions where 40 may run at once (the refused clients come back
after the delay the server's RetryInfo asks for), each turn making two Query calls (one sleeps
200 ms on one of two local workers) where 60 may be pending server-wide; then every session is
deleted. The model is the mock LLM over HTTP with 0.3 s of latency per request, so turns overlap
as they do with a real model. Checked: the excess is refused cleanly
(RESOURCE_EXHAUSTED, AT_CAPACITY, the limit named), nothing admitted is lost (every admitted turn
ends with end_turn, its events gap-free, one result per call in history), and the server's memory
comes back: after a warm-up round, the resident set after two more rounds is within
RSS_MARGIN of what it was after the warm-up (a leak of a few KiB per session or turn would show:
two rounds make 300 sessions and 300 turns).
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import grpc

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from session_server.mock_llm import start_mock_llm
from tests.ops.conftest import PLUGIN, rss_bytes, scrape_until
from tests.polling import poll_until
from tests.session.conftest import (
    Client,
    Processes,
    assert_gap_free,
    call,
    error_details,
    kind,
    write_script,
)

SESSIONS = 200
MAX_SESSIONS = 150
MAX_SUBSCRIBERS = 100
MAX_RUNNING_TURNS = 40
MAX_PENDING_QUERY_CALLS = 60
SLEEP_MS = 200
MODEL_LATENCY = 0.3
ROUNDS = 2  # after the warm-up
# Allowed growth of the server's resident set: Python keeps freed memory in its own arenas and
# allocator caches, so the page count wobbles by a few MiB around a steady state.
RSS_MARGIN = 16 * 1024 * 1024
TURN_TIMEOUT = 120.0


def _at_capacity(exc: grpc.aio.AioRpcError, limit: str) -> None:
    details = error_details(exc)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert details.reason == "AT_CAPACITY" and details.metadata["limit"] == limit, details


async def _create(client: Client, workspace: Path, model: str) -> str | None:
    try:
        return (await client.create(workspace, model)).session_id
    except grpc.aio.AioRpcError as exc:
        _at_capacity(exc, "max_sessions")
        return None


async def _watch(client: Client, session_id: str, opened: asyncio.Event, release: asyncio.Event) -> bool:
    stream = client.watch_stream(session_id, follow=True)
    try:
        first = await stream.read()
    except grpc.aio.AioRpcError as exc:
        _at_capacity(exc, "max_subscribers")
        return False
    finally:
        opened.set()
    assert first.HasField("caught_up")
    await release.wait()
    stream.cancel()
    return True


async def _turn(client: Client, session_id: str) -> tuple[list[events_pb2.Event], int]:
    """Runs one turn, coming back after each refusal's delay; returns its events and the refusals."""
    refusals = 0
    while True:
        try:
            return await client.send(session_id, "work", within=TURN_TIMEOUT), refusals
        except grpc.aio.AioRpcError as exc:
            _at_capacity(exc, "max_running_turns")
            refusals += 1
            delay = float(error_details(exc).metadata["retry_after_seconds"])
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))


async def _round(client: Client, workspace: Path, model: str, metrics_port: int) -> None:
    created = await asyncio.gather(*(_create(client, workspace, model) for _ in range(SESSIONS)))
    sessions = [s for s in created if s is not None]
    assert len(sessions) == MAX_SESSIONS

    release = asyncio.Event()
    opened = [asyncio.Event() for _ in sessions]
    watchers = [asyncio.create_task(_watch(client, s, o, release)) for s, o in zip(sessions, opened, strict=True)]
    await asyncio.gather(*(o.wait() for o in opened))
    release.set()
    assert sum(await asyncio.gather(*watchers)) == MAX_SUBSCRIBERS

    turns = await asyncio.gather(*(_turn(client, s) for s in sessions))
    assert sum(refused for _, refused in turns) > 0, "40 turns at once never refused one of 150"
    calls_refused = 0
    for session_id, (events, _) in zip(sessions, turns, strict=True):
        assert_gap_free(events)
        errors = [e.error for e in events if kind(e) == "error"]
        # One line, errors first: a CI summary shows only the first line of a failure.
        assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN, (
            f"session {session_id} ended with errors {[(e.reason, e.message) for e in errors]}")
        results = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
        assert len(results) == 2
        for result in results:
            assert not result.is_error or result.error_kind == tools_pb2.ERROR_KIND_AT_CAPACITY, result
            calls_refused += result.is_error
        history = await client.history(session_id)
        roles = [m.role for m in history]
        assert roles == [session_pb2.MESSAGE_ROLE_USER, session_pb2.MESSAGE_ROLE_ASSISTANT,
                         session_pb2.MESSAGE_ROLE_TOOL, session_pb2.MESSAGE_ROLE_TOOL,
                         session_pb2.MESSAGE_ROLE_ASSISTANT], session_id
    print(f"round: {sum(r for _, r in turns)} turn refusals, {calls_refused} Query calls refused at capacity")

    await asyncio.gather(*(client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=s), timeout=30)
                           for s in sessions))
    # Everything the round held is let go.
    await scrape_until(metrics_port, lambda p: (
        p.value("codelane_turns_running") == 0 and p.value("codelane_event_subscribers") == 0
        and p.value("codelane_admission_in_use", limit="max_sessions") == 0
        and p.value("codelane_admission_in_use", limit="max_subscribers") == 0
        and p.value("codelane_admission_in_use", limit="max_pending_query_calls") == 0
        and p.value("codelane_backlog_calls", lane="query", required_labels="") == 0
    ), "the server idle again")


async def test_two_hundred_sessions_against_lower_limits(processes: Processes, workspace: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, [
        {"text": "", "tool_calls": [call("sleep", "s", ms=SLEEP_MS), call("read", "r", file_path="a.txt")]},
        {"text": "Done."},
    ])
    # A model that takes its time, as real ones do: turns overlap, so their limit is reached.
    runner, url = await start_mock_llm(script, latency=MODEL_LATENCY)
    try:
        await _load(processes, workspace, tmp_path, url)
    finally:
        await runner.cleanup()


async def _load(processes: Processes, workspace: Path, tmp_path: Path, url: str) -> None:
    model = "openai:mock"
    env = {"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": "test"}
    server = await processes.start_server(tmp_path / "data", model=model, env=env, local_workers=2, args=(
        "--tools", PLUGIN, "--metrics-listen", "127.0.0.1:0",
        "--max-llm-requests", str(MAX_RUNNING_TURNS),
        "--max-sessions", str(MAX_SESSIONS), "--max-subscribers", str(MAX_SUBSCRIBERS),
        "--max-running-turns", str(MAX_RUNNING_TURNS), "--max-pending-query-calls", str(MAX_PENDING_QUERY_CALLS),
    ))
    client = server.client
    # Printed after the listening line the start waited for: the kernel picked a free port.
    said = await poll_until(lambda: re.search(r"^codelane server metrics on port (\d+)$", server.out.read_text(),
                                              re.MULTILINE), what="the server's metrics port")
    metrics_port = int(said.group(1))
    await client.wait_workers("local-1", "local-2")

    started = rss_bytes(server.pid)
    await _round(client, workspace, model, metrics_port)  # warm-up: the server's steady state
    baseline = rss_bytes(server.pid)
    after = []
    for _ in range(ROUNDS):
        await _round(client, workspace, model, metrics_port)
        after.append(rss_bytes(server.pid))
    mib = 1024 * 1024
    print(f"server RSS: {started / mib:.1f} MiB at the start, {baseline / mib:.1f} MiB after the warm-up round, "
          f"{', '.join(f'{a / mib:.1f}' for a in after)} MiB after each later round "
          f"(margin {RSS_MARGIN / mib:.0f} MiB)")
    assert after[-1] - baseline <= RSS_MARGIN, (baseline, after)
    page = await scrape_until(metrics_port, lambda p: True, "a scrape")
    assert page.value("codelane_admission_refusals_total", limit="max_sessions") == 50 * (ROUNDS + 1)
    assert page.value("codelane_admission_refusals_total", limit="max_subscribers") == 50 * (ROUNDS + 1)
    assert page.value("codelane_turns_total", stop_reason="end_turn") == MAX_SESSIONS * (ROUNDS + 1)
