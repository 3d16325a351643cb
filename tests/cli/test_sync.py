"""The sync SDK (codelane.sync) end to end, and that it stops its thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import codelane
from codelane import events as ev
from codelane.sync import Client, CodelaneError, Session
from tests.cli.conftest import ThreadedServer, call, write_script
from tests.polling import poll_until


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "codelane-sync-loop"]


def test_a_session_end_to_end(server: ThreadedServer, workspace: Path) -> None:
    with Client(server.address, timeout=10) as client:
        assert len(_loop_threads()) == 1
        session = client.create_session(workspace, labels={"k": "v"})
        assert isinstance(session, Session) and session.id.startswith("s_")
        assert session.info.workspace == str(workspace) and session.info.labels == {"k": "v"}

        events = list(session.send("fix it"))
        assert isinstance(events[0], ev.TurnStarted) and isinstance(events[-1], ev.TurnFinished)
        assert events[-1].stop_reason == "end_turn"
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))

        replay = list(session.watch(after=4, follow=False))
        assert replay[:-1] == events[4:]
        assert replay[-1] == ev.CaughtUp(events[-1].sequence)

        messages = session.messages()
        assert [m.role for m in messages] == ["user", "assistant", "tool", "tool", "tool", "assistant", "tool",
                                              "tool", "assistant"]
        assert messages[0].text == "fix it" and messages[-1].text == "Done."
        assert session.refresh().last_sequence == events[-1].sequence == session.info.last_sequence
        assert session.cancel() is False  # no turn running

        again = client.get_session(session.id)
        assert again.id == session.id and again.info.message_count == len(messages)
        listed = list(client.list_sessions(page_size=1))
        assert [s.session_id for s in listed] == [session.id]
        assert {lane.lane for lane in client.queue_stats()} == {"query", "execute", "generate"}
        assert client.list_workers() == []

        with pytest.raises(CodelaneError) as caught:
            client.get_session("s_missing")
        assert caught.value.code == "NOT_FOUND" and "s_missing" in caught.value.message
        client.delete_session(session.id)
        with pytest.raises(CodelaneError):
            session.refresh()
    assert client.closed
    assert _loop_threads() == []


def test_leaving_a_send_early_then_resuming_with_watch(make_server, tmp_path: Path, workspace: Path) -> None:
    model = write_script(tmp_path / "slowish.json", [
        {"text": "Running.", "tool_calls": [call("bash", "c_sleep", command="sleep 0.5; echo slept")]},
        {"text": "Done."},
    ])  # fmt: skip
    server = make_server(model=model)
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)
        seen = 0
        for event in session.send("go"):
            seen = event.sequence
            if isinstance(event, ev.ToolCallStarted):
                break  # stop listening; the turn goes on
        rest = []
        for event in session.watch(after=seen):
            rest.append(event)
            if isinstance(event, ev.TurnFinished):
                break
        sequences = [e.sequence for e in rest if not isinstance(e, ev.CaughtUp)]
        assert sequences == list(range(seen + 1, seen + 1 + len(sequences)))
        assert rest[-1].stop_reason == "end_turn"
        finished = next(e for e in rest if isinstance(e, ev.ToolCallFinished))
        assert finished.result.output.strip() == "slept"


def test_close_cancels_a_blocked_watch_and_stops_the_thread(server: ThreadedServer, workspace: Path) -> None:
    client = Client(server.address, timeout=10)
    session = client.create_session(workspace)
    outcome: list[object] = []
    first_event = threading.Event()

    def follow() -> None:
        try:
            for event in session.watch(follow=True):
                outcome.append(event)
                first_event.set()
        except CodelaneError as exc:
            outcome.append(exc)
            first_event.set()

    watcher = threading.Thread(target=follow, daemon=True)  # a failed test must not keep pytest from exiting
    watcher.start()
    assert first_event.wait(10), "the watch sent nothing"
    assert isinstance(outcome[0], ev.CaughtUp), outcome  # caught up: now blocked waiting for live events
    client.close()
    watcher.join(10)
    assert not watcher.is_alive()
    assert isinstance(outcome[-1], CodelaneError) and outcome[-1].code == "CANCELLED"
    assert _loop_threads() == []
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.list_workers()


async def test_the_async_clients_close_ends_its_calls_with_cancelled(server: ThreadedServer, workspace: Path) -> None:
    # As the sync client's (above) and the Node client's. They raised asyncio.CancelledError in
    # tasks nobody had cancelled, which then ended as cancelled (quietly, in a TaskGroup) instead
    # of failing with the SDK's error.
    client = codelane.client.Client(server.address, timeout=10)
    session = await client.create_session(workspace)
    watch = session.watch(follow=True)
    assert await anext(watch) == ev.CaughtUp(0)  # now waiting for live events
    following = asyncio.ensure_future(anext(watch))
    claim = asyncio.ensure_future(session.claim_external_tasks("closing", wait=30))
    await poll_until(lambda: server.server.sessions.external._waiters, what="the claim to long-poll")
    await client.close()
    for pending in (following, claim):
        with pytest.raises(CodelaneError) as raised:
            await pending
        assert raised.value.code == "CANCELLED"


def test_one_client_serves_many_threads(server: ThreadedServer, workspace: Path) -> None:
    with Client(server.address, timeout=10) as client:
        results: list[str] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                session = client.create_session(workspace)
                finished = [e for e in session.send("fix it") if isinstance(e, ev.TurnFinished)]
                results.append(finished[0].stop_reason)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and results == ["end_turn"] * 4
        assert len(list(client.list_sessions())) == 4


def test_async_methods_without_a_sync_twin_are_forwarded(server: ThreadedServer, workspace: Path) -> None:
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)

        async def echo(value: int, *, twice: bool = False) -> int:
            await asyncio.sleep(0)
            return value * 2 if twice else value

        async def count(n: int):
            for i in range(n):
                yield i

        async def myself():
            return session._target

        session._target.echo = echo  # as if the async SDK had grown these methods
        session._target.count = count
        session._target.myself = myself
        assert session.echo(21, twice=True) == 42
        assert list(session.count(3)) == [0, 1, 2]
        assert isinstance(session.myself(), Session)  # async sessions come back wrapped
        assert "echo" in dir(session)
        with pytest.raises(AttributeError):
            session.no_such_method  # noqa: B018
        for name in (
            "confirm", "claim_external_tasks", "complete_external_task", "renew_external_task_lease",
            "run_external_tasks",
        ):
            assert hasattr(session, name) == hasattr(session._target, name)
            assert hasattr(client, name) == hasattr(client._target, name)


def test_a_dropped_client_stops_its_thread(server: ThreadedServer) -> None:
    import gc

    client = Client(server.address, timeout=10)
    client.list_workers()
    [loop_thread] = _loop_threads()
    del client
    gc.collect()
    loop_thread.join(10)
    assert not loop_thread.is_alive()


def test_an_unreachable_server_raises_unavailable(unused_port: int) -> None:
    with Client(f"127.0.0.1:{unused_port}", timeout=5) as client, pytest.raises(CodelaneError) as caught:
        client.list_workers()
    assert caught.value.code == "UNAVAILABLE"


def test_the_package_exports_are_lazy() -> None:
    import subprocess
    import sys

    code = ("import sys, codelane; assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules; "
            "codelane.TurnFinished; assert 'grpc' not in sys.modules; codelane.Client; assert 'grpc' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert codelane.Client is codelane.client.Client and codelane.CodelaneError is CodelaneError
    assert codelane.TurnFinished is ev.TurnFinished
    assert set(codelane.__all__) <= set(dir(codelane))
    for name in codelane.__all__:
        assert getattr(codelane, name) is not None
    with pytest.raises(AttributeError):
        codelane.nothing_here  # noqa: B018


def test_external_tasks_served_by_a_plain_function(make_server, tmp_path: Path, workspace: Path) -> None:
    model = write_script(tmp_path / "external.json", [
        {"text": "Running.", "tool_calls": [call("bash", "c_ext", command="echo from-server")]},
        {"text": "Done."},
    ])  # fmt: skip
    server = make_server(model=model)
    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace, lanes={"execute": "external"})
        seen: list[str] = []

        def handler(task) -> ev.ToolResult:  # a plain function, run in a worker thread
            seen.append(f"{task.call.tool_name}:{task.call.arguments['command']}")
            return ev.ToolResult(output="ran by the client")

        stop = threading.Event()
        served: list[int] = []
        server_thread = threading.Thread(
            target=lambda: served.append(session.run_external_tasks("me", handler, stop=stop, wait=1.0)))
        server_thread.start()
        try:
            events = list(session.send("go"))
        finally:
            stop.set()
            server_thread.join(20)
        assert not server_thread.is_alive() and served == [1]
        assert seen == ["bash:echo from-server"]
        finished = next(e for e in events if isinstance(e, ev.ToolCallFinished))
        assert finished.result.output == "ran by the client"
        assert events[-1].stop_reason == "end_turn"


def test_ctrl_c_while_waiting_stops_the_call_and_the_client_goes_on(server: ThreadedServer, workspace: Path) -> None:
    import _thread

    with Client(server.address, timeout=10) as client:
        session = client.create_session(workspace)
        for _ in range(2):
            timer = threading.Timer(0.3, _thread.interrupt_main)  # as Ctrl-C would
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                for _event in session.watch(follow=True):  # blocks: nothing new will come
                    pass
            timer.join()
        assert [e.kind for e in session.send("fix it")][-1] == "turn_finished"


def test_errors_raised_by_the_async_call_come_through(server: ThreadedServer) -> None:
    with Client(server.address, timeout=10) as client:

        async def slow() -> None:
            raise TimeoutError("from the coroutine")

        client._target.slow = slow
        with pytest.raises(TimeoutError, match="from the coroutine"):
            client.slow()
