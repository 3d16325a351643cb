"""A worker's tool schemas, played by an attacker. jsonschema resolved a `$ref` it could not find
in the schema by retrieving it: an `http://` one froze the server's event loop on a listener that
never answered, a `file://` one quoted the server's own file to the model, a dangling one failed
the whole turn. Now a Hello whose references do not resolve within its schema is refused, and
checking a call's arguments retrieves nothing and ends, whatever happens, as that call's result.
A listener on 127.0.0.1 records whether anything ever connected to it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from codelane.v1 import events_pb2, tools_pb2, worker_pb2, worker_pb2_grpc
from session_server.arguments import ArgumentChecker
from tests.polling import poll_until
from tests.session.conftest import call, error_details, kind, scripted
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import Lane, Tool, ToolResult, ToolSpec

BOUND = 20.0
SECRET = "SERVER-FILE-CONTENT-7431"


class Listener:
    """Counts the connections made to it. It closes each at once, so that a fetch fails at once
    instead of waiting for ever: a test then fails on the count, not on a timeout."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/{path}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            # Counted before it is closed: a fetch returns only after this.
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._socket.close()
        self._thread.join()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "server_side.json"
    path.write_text(json.dumps({"enum": [SECRET]}), encoding="utf-8")
    return path


def _spec(name: str, schema: dict[str, Any]) -> tools_pb2.ToolSpec:
    return tools_pb2.ToolSpec(name=name, parameters_json_schema=json.dumps(schema), lane=tools_pb2.LANE_QUERY,
                              idempotent=True)


def _outside_references(listener: Listener, secret_file: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Schemas whose references do not resolve within them, each with the reference as quoted."""
    remote = listener.url("schema.json")
    return {
        "remote-ref": ({"$ref": remote}, remote),
        "nested-remote-ref": ({"type": "object", "properties": {"x": {"$ref": remote}}}, remote),
        "remote-dynamic-ref": ({"type": "object", "properties": {"x": {"$dynamicRef": f"{remote}#meta"}}},
                               f"{remote}#meta"),
        # Relative to the schema's own $id, which names the listener.
        "relative-to-remote-id": ({"$id": listener.url("root.json"), "properties": {"x": {"$ref": "other.json"}}},
                                  "other.json"),
        # Inside an "enum", which no check visits as a schema, but where the $ref beside it points.
        "via-an-enum": ({"$ref": "#/enum/0", "enum": [{"$ref": remote}]}, remote),
        "file-ref": ({"type": "object", "properties": {"x": {"$ref": secret_file.as_uri()}}}, secret_file.as_uri()),
        "dangling-ref": ({"type": "object", "properties": {"x": {"$ref": "#/nope"}}}, "#/nope"),
    }


CASES = ["remote-ref", "nested-remote-ref", "remote-dynamic-ref", "relative-to-remote-id", "via-an-enum", "file-ref",
         "dangling-ref"]


@pytest.mark.parametrize("case", CASES)
async def test_a_hello_whose_schema_refers_outside_itself_is_refused_and_nothing_is_fetched(
    make_server, listener: Listener, secret_file: Path, case: str
) -> None:
    schema, reference = _outside_references(listener, secret_file)[case]
    server = await make_server()
    error = await _refused_hello(server, [_spec("read_ok", {"type": "object"}), _spec("probe", schema)])
    assert "'probe'" in error.message and repr(reference) in error.message and "$defs" in error.message
    assert SECRET not in error.message
    assert listener.connections == 0
    assert server.server.pool.workers() == []


async def _refused_hello(server, tools: list[tools_pb2.ToolSpec]) -> Any:
    """The error details of the Hello offering `tools`, which must be refused as INVALID_HELLO."""
    hello = worker_pb2.Hello(worker_id="probe", slots=1, tools=tools)
    async with grpc.aio.insecure_channel(server.client.address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect()
        await stream.write(worker_pb2.ConnectRequest(hello=hello))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stream.read(), BOUND)
    error = error_details(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HELLO")
    return error


async def _turn_with_a_raw_worker(make_server, workspace: Path, tmp_path: Path, tools: list[tools_pb2.ToolSpec],
                                  calls: list[dict[str, Any]]) -> tuple[list[events_pb2.Event], list[str]]:
    """A turn whose model makes `calls`, beside a worker speaking the raw protocol that offers
    `tools` and answers every call it is sent; returns the events and the arguments it was sent."""
    server = await make_server()
    outbox: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()
    await outbox.put(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(worker_id="raw", slots=4, tools=tools)))
    received: list[str] = []

    async def requests():
        while True:
            yield await outbox.get()

    async def answering(stream) -> None:
        async for message in stream:
            for assign in message.assignments.assigns:
                received.append(assign.arguments_json)
                answers = worker_pb2.CallResults()
                answers.results.add(call_id=assign.call_id, attempt=assign.attempt, dispatch_id=assign.dispatch_id,
                                    result=tools_pb2.ToolResult(output=f"ran {assign.tool_name}"))
                await outbox.put(worker_pb2.ConnectRequest(results=answers))

    async with grpc.aio.insecure_channel(server.client.address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect(requests())
        task = asyncio.create_task(answering(stream))
        try:
            await poll_until(lambda: server.server.pool.workers(), what="the raw worker to join")
            model = scripted(tmp_path, [{"tool_calls": calls}, {"text": "Done."}])
            session = await server.client.create(workspace, model)
            events = await server.client.send(session.session_id, "go")
        finally:
            task.cancel()
    return events, received


def _results(events: list[events_pb2.Event]) -> dict[str, tools_pb2.ToolResult]:
    return {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
            if kind(e) == "tool_call_finished"}


async def test_references_within_the_schema_work_and_its_schema_keyword_is_never_fetched(
    make_server, workspace: Path, tmp_path: Path, listener: Listener
) -> None:
    schema = {
        "$schema": listener.url("meta-schema"),
        "type": "object",
        "properties": {"path": {"$ref": "#/$defs/path"}, "depth": {"$ref": "#/definitions/depth"}},
        "required": ["path"],
        "$defs": {"path": {"type": "string"}},
        "definitions": {"depth": {"type": "integer"}},
    }
    events, received = await _turn_with_a_raw_worker(
        make_server, workspace, tmp_path, [_spec("walk", schema)],
        [call("walk", "good", path="src", depth=2), call("walk", "bad", path="src", depth="deep")],
    )
    results = _results(events)
    assert results["good"].output == "ran walk" and not results["good"].is_error
    assert results["bad"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "'$.depth'" in results["bad"].output and "'deep' is not of type 'integer'" in results["bad"].output
    assert [json.loads(arguments) for arguments in received] == [{"path": "src", "depth": 2}]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN
    assert listener.connections == 0


async def test_a_schema_that_refers_to_itself_without_end_fails_only_its_call(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # It resolves within itself, so the Hello is accepted; checking any call recurses until the
    # stack runs out. That RecursionError failed the turn (INTERNAL), and every call with it.
    events, received = await _turn_with_a_raw_worker(
        make_server, workspace, tmp_path, [_spec("loop", {"$ref": "#"}), _spec("fine", {"type": "object"})],
        [call("loop", "loop", x=1), call("fine", "fine")],
    )
    results = _results(events)
    assert results["loop"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "refers to itself without end" in results["loop"].output
    assert results["fine"].output == "ran fine"
    assert received == ["{}"]
    assert [kind(e) for e in events if kind(e) == "error"] == []
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN


@pytest.mark.parametrize("case", [*CASES, "bad-pointer", "pointer-to-a-string"])
def test_checking_arguments_retrieves_nothing_and_raises_nothing_whatever_the_schema_holds(
    listener: Listener, secret_file: Path, case: str
) -> None:
    # A spec the Hello check never saw (the check is what keeps these out; this is what happens if
    # one got past it): every call gets a reason, the server fetches and reads nothing.
    schema = {
        **{name: schema for name, (schema, _) in _outside_references(listener, secret_file).items()},
        "bad-pointer": {"$ref": "#/allOf/x", "allOf": [{}]},
        "pointer-to-a-string": {"$ref": "#/type", "type": "object"},
    }[case]
    spec = ToolSpec(name="probe", description="", parameters=schema, lane=Lane.QUERY, idempotent=True)
    problem = ArgumentChecker().problem(spec, {"x": SECRET[:3]})
    assert problem is not None and "probe" in problem and "cannot be checked" in problem
    assert SECRET not in problem
    assert listener.connections == 0


def test_a_plugin_tool_whose_schema_refers_outside_itself_is_not_registered(listener: Listener) -> None:
    async def run(_ctx: Any, _args: dict[str, Any]) -> ToolResult:
        return ToolResult(output="ran")

    remote = listener.url("plugin.json")
    spec = ToolSpec(name="plugin_tool", description="", parameters={"$ref": remote}, lane=Lane.QUERY,
                    idempotent=True)
    with pytest.raises(ValueError, match="plugin_tool") as caught:
        ToolRegistry([Tool(spec=spec, run=run)])
    assert repr(remote) in str(caught.value)
    assert listener.connections == 0


# -- patterns ------------------------------------------------------------------------------------
# jsonschema matched a schema's patterns with Python's `re`, which backtracks: a worker's
# `^(a+)+$` and a model's argument of 35 characters held the server's event loop for minutes, 100
# characters for ever (2^100 steps). Now they are matched by RE2, in linear time.

BACKTRACKING = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^(a+)+$"}},
                "patternProperties": {"^(x+)+$": {"type": "integer"}}, "additionalProperties": False}


async def test_a_pattern_that_backtracks_without_end_is_matched_in_linear_time(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    events, received = await _turn_with_a_raw_worker(
        make_server, workspace, tmp_path, [_spec("probe", BACKTRACKING)],
        [call("probe", "bad", word="a" * 100 + "!"), call("probe", "keys", **{"x" * 100 + "!": 1}),
         call("probe", "good", word="aaaa", xxx=3)],
    )
    results = _results(events)
    assert results["bad"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "does not match '^(a+)+$'" in results["bad"].output
    assert results["keys"].error_kind == tools_pb2.ERROR_KIND_INVALID_ARGUMENTS
    assert "does not match any of the regexes: '^(x+)+$'" in results["keys"].output
    assert results["good"].output == "ran probe"
    assert received == ['{"word": "aaaa", "xxx": 3}']


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, "RE2 does not take"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "a(?=b)"}}}, "RE2 does not take"),
    ({"type": "object", "patternProperties": {"(?<!x)y": {}}}, "RE2 does not take"),
    ({"type": "object", "patternProperties": {"^a": {}}, "allOf": [{"unevaluatedProperties": False}]},
     "patternProperties and unevaluatedProperties together"),
])  # fmt: skip
async def test_a_hello_whose_patterns_cannot_be_matched_in_linear_time_is_refused(
    make_server, schema: dict[str, Any], says: str
) -> None:
    server = await make_server()
    error = await _refused_hello(server, [_spec("probe", schema)])
    assert "'probe'" in error.message and says in error.message
    assert server.server.pool.workers() == []


def test_a_property_named_pattern_is_no_pattern() -> None:
    # grep's own schema has a property called "pattern": an object, not a regex to check.
    spec = ToolSpec(name="probe", description="", lane=Lane.QUERY, idempotent=True, parameters={
        "type": "object", "properties": {"pattern": {"type": "string", "pattern": "^[a-z]+$"}}})
    checker = ArgumentChecker()
    assert checker.problem(spec, {"pattern": "abc"}) is None
    assert "does not match" in (checker.problem(spec, {"pattern": "ABC"}) or "")
