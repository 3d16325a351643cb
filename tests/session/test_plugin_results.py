"""A plugin tool's result of the wrong shape ends its call with an INTERNAL error that says what is
wrong, whether the tool ran on a worker or in the server, and the session stays readable. A
plugin's failing declarations (effects, cheaper_here) cost its call only what they would have
saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from tests.faulty_results_plugin import FAULTS
from tests.session.conftest import call, kind, scripted

PLUGIN = "tests.faulty_results_plugin"


async def _server_running_the_plugin(make_server, where: str):
    """A server that runs the plugin's tools on its local worker, or itself."""
    on_worker = where == "worker"
    server = await make_server(local_workers=1 if on_worker else 0, local_worker_tools=[PLUGIN],
                               local_fallback=not on_worker)
    if on_worker:
        await server.client.wait_workers("local-1")
    return server


# On a worker, a str output reached the hub as an empty success. In the server, an unknown error
# kind or an exit code past 32 bits failed every read of the session's events (SendMessage ended
# UNKNOWN), and metadata JSON cannot write stopped the server's event log for good.
@pytest.mark.parametrize("where", ["worker", "server"])
async def test_a_plugins_malformed_result_is_an_error_saying_so(
    make_server, workspace: Path, tmp_path: Path, where: str
) -> None:
    server = await _server_running_the_plugin(make_server, where)
    calls = [call(name, f"c_{name}") for name in [*FAULTS, "kind_as_text"]]
    session = await server.client.create(workspace, scripted(tmp_path, [{"text": "", "tool_calls": calls},
                                                                         {"text": "Done."}]))
    events = await server.client.send(session.session_id, "call them all")
    assert kind(events[-1]) == "turn_finished", events[-1]

    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
                if kind(e) == "tool_call_finished"}
    history = {m.tool_call_id: m.tool_result for m in await server.client.history(session.session_id)
               if m.role == session_pb2.MESSAGE_ROLE_TOOL}
    stored, _ = await server.client.watch(session.session_id)
    assert [kind(e) for e in stored] == [kind(e) for e in events]
    for name, (_, says) in FAULTS.items():
        for result in (finished[f"c_{name}"], history[f"c_{name}"]):
            assert result.is_error and result.error_kind == tools_pb2.ERROR_KIND_INTERNAL, (name, result)
            assert result.output.startswith(f"{name} failed: the tool returned ") and says in result.output, result
    for result in (finished["c_kind_as_text"], history["c_kind_as_text"]):
        assert result.error_kind == tools_pb2.ERROR_KIND_PATH_ESCAPE and result.output == "outside", result
    assert {r.worker_id for r in finished.values()} == {"local-1" if where == "worker" else "local"}


# SystemExit is no Exception: it went past every handler, out of the event loop, and the process
# (the worker, or the server itself) exited.
@pytest.mark.parametrize("where", ["worker", "server"])
async def test_a_plugin_that_calls_sys_exit_ends_its_call_not_the_process(
    make_server, workspace: Path, tmp_path: Path, where: str
) -> None:
    server = await _server_running_the_plugin(make_server, where)
    session = await server.client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("exits", "c1")]}, {"text": "Done."},
        {"text": "", "tool_calls": [call("exits", "c2")]}, {"text": "Done again."},
    ]))
    for call_id in ("c1", "c2"):  # the same process runs the second call
        events = await server.client.send(session.session_id, "lint")
        assert kind(events[-1]) == "turn_finished" and not any(kind(e) == "worker_lost" for e in events), events
        [result] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
        assert result.error_kind == tools_pb2.ERROR_KIND_INTERNAL and result.attempt == 1, (call_id, result)
        assert result.output == "exits failed unexpectedly: SystemExit: usage: lint [FILE]", result
        assert result.worker_id == ("local-1" if where == "worker" else "local")


# The server works out each call's effects when the model's response arrives (an Execute call's) or
# when it orders a Query call against an Execute one: a plugin's effects function that raised, or
# returned no Effects, ended the whole turn with an error, every call of the response cancelled.
@pytest.mark.parametrize("tool", ["effects_raise", "effects_not_effects", "execute_effects_raise"])
async def test_a_plugins_failing_effects_order_its_call_against_everything(
    make_server, workspace: Path, tmp_path: Path, tool: str
) -> None:
    server = await make_server(local_workers=0, local_worker_tools=["tests.faulty_hooks_plugin"])
    session = await server.client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("write", "c_write", file_path="b.txt", content="x"), call(tool, "c_tool")]},
        {"text": "Done."},
    ]))
    events = await server.client.send(session.session_id, "go")
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN, events[-1]
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
                if kind(e) == "tool_call_finished"}
    assert finished["c_tool"].output == "ran" and not finished["c_write"].is_error, finished
    assert (workspace / "b.txt").read_text() == "x"


# The placement rule asks a tool whether a call costs less here than on a worker: a plugin's
# answer that raised ended the call with an internal error, never run anywhere.
async def test_a_plugins_failing_placement_estimate_sends_its_call_to_a_worker(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server = await make_server(local_workers=1, local_worker_tools=["tests.faulty_hooks_plugin"])
    await server.client.wait_workers("local-1")
    session = await server.client.create(workspace, scripted(tmp_path, [
        {"text": "", "tool_calls": [call("cheaper_raises", "c1")]}, {"text": "Done."}]))
    events = await server.client.send(session.session_id, "go")
    [result] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert result.output == "ran" and result.worker_id == "local-1", result
