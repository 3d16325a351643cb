"""`Session.send` starts the turn when it is called, as the Node client's `sendMessage` does, in
the async SDK and in the sync one: iterating only reads the turn's events. Each turn waits for a
file the test creates, so the session is seen running before anything is read."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from codelane import events as ev
from codelane.client import Client
from tests.cli.conftest import ThreadedServer, call, write_script
from tests.polling import poll_until, wait_until

WAITING = [
    {"text": "Waiting.", "tool_calls": [call("bash", "c_wait", command="while [ ! -e go ]; do sleep 0.05; done")]},
    {"text": "Done."},
]


@pytest.fixture
def waiting(make_server, tmp_path: Path) -> ThreadedServer:
    return make_server(model=write_script(tmp_path / "waiting.json", WAITING))


async def test_send_starts_the_turn_before_it_is_iterated(waiting: ThreadedServer, workspace: Path) -> None:
    async with Client(waiting.address, timeout=10) as client:
        session = await client.create_session(workspace)
        events = session.send("go")  # not iterated yet
        await poll_until(lambda: _running(session), what="the session to run the turn send started")
        (workspace / "go").touch()
        seen = [event async for event in events]  # the same events as ever, from the start
    assert isinstance(seen[0], ev.TurnStarted) and seen[0].user_text == "go"
    assert isinstance(seen[-1], ev.TurnFinished) and seen[-1].stop_reason == "end_turn"
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))


async def test_a_send_whose_events_are_never_read_still_runs_its_turn(waiting: ThreadedServer,
                                                                      workspace: Path) -> None:
    async with Client(waiting.address, timeout=10) as client:
        session = await client.create_session(workspace)
        session.send("go")  # dropped at once: the turn is started all the same
        gc.collect()
        await poll_until(lambda: _running(session), what="the session to run the turn send started")
        (workspace / "go").touch()
        async for item in session.watch(follow=True):
            if isinstance(item, ev.TurnFinished):
                break
    assert isinstance(item, ev.TurnFinished) and item.stop_reason == "end_turn"


def test_sync_send_starts_the_turn_before_it_is_iterated(waiting: ThreadedServer, workspace: Path) -> None:
    from codelane.sync import Client as SyncClient

    with SyncClient(waiting.address, timeout=10) as client:
        session = client.create_session(workspace)
        events = session.send("go")  # not iterated yet
        wait_until(lambda: session.refresh().state == "running", what="the session to run the turn send started")
        (workspace / "go").touch()
        seen = list(events)
    assert isinstance(seen[0], ev.TurnStarted) and isinstance(seen[-1], ev.TurnFinished)
    assert seen[-1].stop_reason == "end_turn"


async def _running(session) -> bool:
    return (await session.refresh()).state == "running"

