from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tool_worker.plugins import ToolHost
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec

QUERY_TOOLS = {"read", "glob", "grep", "ls", "list_files", "search"}
EXECUTE_TOOLS = {"bash", "execute", "write", "edit", "delete", "move", "copy"}


def _tool(name: str, run: Any) -> Tool:
    spec = ToolSpec(
        name=name,
        description="test",
        parameters={"type": "object", "properties": {"n": {"type": "integer"}}},
        lane=Lane.QUERY,
        idempotent=True,
    )
    return Tool(spec=spec, run=run)


def test_builtin_specs(registry: ToolRegistry) -> None:
    assert set(registry.names()) == QUERY_TOOLS | EXECUTE_TOOLS
    assert registry.names() == sorted(registry.names())
    assert {spec.name for spec in registry.specs(Lane.QUERY)} == QUERY_TOOLS
    assert {spec.name for spec in registry.specs(Lane.EXECUTE)} == EXECUTE_TOOLS
    assert [spec.name for spec in registry.specs()] == registry.names()
    for spec in registry.specs():
        assert spec.idempotent is (spec.lane is Lane.QUERY)
        assert spec.parameters["type"] == "object"
        assert len(spec.description) > 40
    tool = registry.get("read")
    assert tool is not None and tool.name == "read"
    assert registry.get("nope") is None


async def test_unknown_tool(registry: ToolRegistry, tmp_path: Path) -> None:
    result = await registry.execute("nope", tmp_path, "{}")
    assert result.is_error and result.error_kind is ErrorKind.UNKNOWN_TOOL
    assert "nope" in result.output and "grep" in result.output


@pytest.mark.parametrize(
    ("arguments_json", "needle"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('"x"', "must be a JSON object"),
     ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
     ('{"n": ' + "9" * 5000 + "}", "an integer of more than 4,300 digits")],
    ids=["not-json", "array", "string", "nested-too-deeply", "huge-integer"],
)
async def test_bad_json_never_runs_the_tool(arguments_json: str, needle: str, tmp_path: Path) -> None:
    ran = False

    async def run(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        nonlocal ran
        ran = True
        return ToolResult(output="ran")

    registry = ToolRegistry([_tool("t", run)])
    result = await registry.execute("t", tmp_path, arguments_json)
    assert result.is_error and result.error_kind is ErrorKind.INVALID_ARGUMENTS
    assert needle in result.output
    assert not ran


async def test_schema_violation_names_the_field(call: Any) -> None:
    result = await call("read", file_path="README.md", offset="ten")
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS
    assert "offset" in result.output and "'ten' is not of type 'integer'" in result.output
    missing = await call("grep")
    assert missing.error_kind is ErrorKind.INVALID_ARGUMENTS and "'pattern' is a required property" in missing.output
    extra = await call("ls", colour=True)
    assert extra.error_kind is ErrorKind.INVALID_ARGUMENTS and "colour" in extra.output


async def test_failures_become_results(tmp_path: Path) -> None:
    async def fail(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        raise ToolFailure("no such thing", ErrorKind.PERMISSION_DENIED)

    async def crash(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        raise KeyError("boom")

    registry = ToolRegistry([_tool("fail", fail), _tool("crash", crash)])
    failed = await registry.execute("fail", tmp_path, "{}")
    assert (failed.error_kind, failed.output) == (ErrorKind.PERMISSION_DENIED, "no such thing")
    crashed = await registry.execute("crash", tmp_path, "{}")
    assert crashed.error_kind is ErrorKind.INTERNAL and "KeyError" in crashed.output and "boom" in crashed.output
    assert crashed.run_time > 0


async def test_a_schema_that_cannot_check_the_arguments_is_a_result_not_an_exception(tmp_path: Path) -> None:
    # {"$ref": "#"} resolves within itself, so it registers; checking anything against it
    # recurses until the stack runs out. The RecursionError escaped execute.
    ran = False

    async def run(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        nonlocal ran
        ran = True
        return ToolResult(output="ran")

    spec = ToolSpec(name="loop", description="test", parameters={"$ref": "#"}, lane=Lane.QUERY, idempotent=True)
    result = await ToolRegistry([Tool(spec=spec, run=run)]).execute("loop", tmp_path, '{"n": 1}')
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS and "refers to itself without end" in result.output
    assert not ran


async def test_run_time_and_cancellation_propagates(tmp_path: Path) -> None:
    started, cleaned = asyncio.Event(), asyncio.Event()
    inside: list[float] = []

    async def slow(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        started.set()
        try:
            await asyncio.Event().wait()  # runs until cancelled
        finally:
            cleaned.set()
        return ToolResult(output="late")

    async def measured(_ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        begin = time.perf_counter()
        await asyncio.sleep(0)  # gives up the loop once, as a real tool does
        inside.append(time.perf_counter() - begin)
        return ToolResult(output=str(args["n"]))

    registry = ToolRegistry([_tool("slow", slow), _tool("measured", measured)])
    before = time.perf_counter()
    result = await registry.execute("measured", tmp_path, '{"n": 3}')
    outside = time.perf_counter() - before
    # The run time covers the tool's own run, and no more than the call took.
    assert result.output == "3" and inside[0] <= result.run_time <= outside
    task = asyncio.create_task(registry.execute("slow", tmp_path, "{}"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def test_load_module(tmp_path: Path) -> None:
    registry = ToolRegistry.builtin()
    registry.load_module("tests.tools.plugin_tools")
    assert "shout" in registry.names()
    result = await registry.execute("shout", tmp_path, json.dumps({"text": "hi"}))
    assert result.output == "HI"
    with pytest.raises(ValueError, match="already exists"):
        registry.load_module("tests.tools.plugin_tools")


def test_load_module_errors() -> None:
    registry = ToolRegistry()
    with pytest.raises(ValueError, match="no TOOLS attribute"):
        registry.load_module("json")
    with pytest.raises(ModuleNotFoundError):
        registry.load_module("tests.tools.no_such_plugin")
    with pytest.raises(ValueError, match="already registered"):
        ToolRegistry([_tool("a", None), _tool("a", None)])
    bad_schema = Tool(
        spec=ToolSpec(name="bad", description="", parameters={"type": 5}, lane=Lane.QUERY, idempotent=True),
        run=None,  # type: ignore[arg-type]
    )
    with pytest.raises(ValueError, match="invalid parameters schema"):
        ToolRegistry([bad_schema])


def test_a_worker_only_module_registers_nothing_without_a_host() -> None:
    registry = ToolRegistry()
    registry.load_module("tests.tools.worker_only_plugin")
    assert registry.names() == []


async def test_a_worker_only_module_gets_the_workers_host(tmp_path: Path) -> None:
    host = ToolHost(cache_dir=tmp_path, labels={"zone": "operator"})
    registry = ToolRegistry()
    registry.load_module("tests.tools.worker_only_plugin", host)
    assert registry.names() == ["whereami"]
    # The module's own labels join the worker's; the operator's win on a clash.
    assert host.labels == {"zone": "operator", "accelerator": "cpu"}
    result = await registry.execute("whereami", tmp_path, "{}")
    assert result.output == str(tmp_path / "whereami")


def test_a_worker_only_module_may_decline(tmp_path: Path) -> None:
    host = ToolHost(cache_dir=tmp_path, required_labels={"whereami": {"accelerator": "gpu"}})
    registry = ToolRegistry()
    registry.load_module("tests.tools.worker_only_plugin", host)
    assert registry.names() == []
    assert host.unmet_requirements("whereami") == {"accelerator": "gpu"}


def test_required_labels_are_added_to_a_tools_spec(registry: ToolRegistry) -> None:
    own = ToolRegistry.builtin()
    own.require_labels("grep", {"zone": "eu"})
    own.require_labels("grep", {"accelerator": "gpu"})
    grep = own.get("grep")
    assert grep is not None and dict(grep.spec.required_labels) == {"zone": "eu", "accelerator": "gpu"}
    assert registry.get("grep").spec.required_labels == {}  # another registry is untouched
    with pytest.raises(KeyError):
        own.require_labels("nope", {"zone": "eu"})


@pytest.mark.parametrize("labels", [{"gpu": True}, {"cuda": 12}, {"zone": "eu\nwest"}, {"": "x"}])
def test_a_plugins_labels_must_be_printable_text(labels: dict, tmp_path: Path) -> None:
    # A value not a str failed the worker's Hello (a traceback at every start).
    host = ToolHost(cache_dir=tmp_path, labels={"zone": "operator"})
    with pytest.raises(ValueError, match="label"):
        host.add_labels(labels)
    assert host.labels == {"zone": "operator"}
    host.add_labels({"accelerator_name": "NVIDIA A100-SXM4-80GB"})  # a device's name, spaces and all
    assert host.labels["accelerator_name"] == "NVIDIA A100-SXM4-80GB"
