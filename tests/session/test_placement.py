"""The placement rules: Query tools named by --local-query-tools run in the server even when workers
offer them, and so do calls cheaper here than on a worker (a read of a small file) unless
--no-local-cheap-calls; the rest go to workers, and where each call ran shows in its events and in
ListTools."""

from __future__ import annotations

from pathlib import Path

import pytest

from codelane.v1 import session_pb2, tools_pb2
from session_server.server import CodelaneServer, ServerConfig, ServerConfigError
from tests.session.conftest import RPC_TIMEOUT, call, kind, scripted
from tool_worker.tools import read

WORKER = "local-1"


@pytest.mark.parametrize("rule", [["read"], []], ids=["reads-local", "no-rule"])
async def test_the_rule_keeps_its_tools_in_the_server_and_sends_the_rest_to_workers(
    make_server, workspace: Path, tmp_path: Path, rule: list[str]
) -> None:
    served = await make_server(local_workers=1, local_query_tools=rule, local_cheap_calls=False)
    client = served.client
    await client.wait_workers(WORKER)
    model = scripted(tmp_path, [
        {"tool_calls": [call("read", "c_read", file_path="src/alpha.py"),
                        call("grep", "c_grep", pattern="needle", path="src")]},
        {"text": "done"},
    ])
    session = await client.create(workspace, model)
    events = await client.send(session.session_id, "go")

    started = {e.tool_call_started.call.call_id: e.tool_call_started.worker_id
               for e in events if kind(e) == "tool_call_started"}
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result
                for e in events if kind(e) == "tool_call_finished"}
    read_runs_on = "local" if rule else WORKER
    assert started == {"c_read": read_runs_on, "c_grep": WORKER}
    assert {call_id: result.worker_id for call_id, result in finished.items()} == started
    assert "needle-alpha" in finished["c_read"].output and not finished["c_read"].is_error
    assert "src/beta.py" in finished["c_grep"].output

    listed = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=session.session_id),
                                             timeout=RPC_TIMEOUT)
    runners = {tool.spec.name: tool.runner for tool in listed.tools}
    assert runners["read"] == (session_pb2.TOOL_RUNNER_SERVER if rule else session_pb2.TOOL_RUNNER_WORKERS)
    assert runners["grep"] == session_pb2.TOOL_RUNNER_WORKERS


def _started_on(events: list) -> dict[str, str]:
    return {e.tool_call_started.call.call_id: e.tool_call_started.worker_id
            for e in events if kind(e) == "tool_call_started"}


async def test_by_default_a_read_of_a_small_file_runs_here_and_every_other_query_call_on_a_worker(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # A file of at most 64 KiB (read.INLINE_READ_BYTES) is read here in less time, and less of the
    # server's CPU, than a worker's round trip costs; anything else a worker offers goes there.
    (workspace / "big.txt").write_text("x" * 100 + "\n" * (read.INLINE_READ_BYTES - 100 + 1))
    (workspace / "link.py").symlink_to(workspace / "src" / "alpha.py")
    served = await make_server(local_workers=1)
    client = served.client
    await client.wait_workers(WORKER)
    model = scripted(tmp_path, [
        {"tool_calls": [call("read", "small", file_path="src/alpha.py"),
                        call("read", "linked", file_path="link.py"),
                        call("read", "big", file_path="big.txt", limit=1),
                        call("read", "missing", file_path="nope.txt"),
                        call("read", "directory", file_path="src"),
                        call("read", "escape", file_path="../outside.txt"),
                        call("grep", "grep", pattern="needle", path="src")]},
        {"text": "done"},
    ])
    events = await client.send((await client.create(workspace, model)).session_id, "go")

    assert _started_on(events) == {"small": "local", "linked": "local", "big": WORKER, "missing": WORKER,
                                   "directory": WORKER, "escape": WORKER, "grep": WORKER}
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result
               for e in events if kind(e) == "tool_call_finished"}
    assert "needle-alpha" in results["small"].output and results["linked"].output == results["small"].output
    assert results["big"].output.startswith("     1\t" + "x" * 100) and not results["big"].is_error
    assert "file not found: nope.txt" in results["missing"].output
    assert results["escape"].error_kind == tools_pb2.ERROR_KIND_PATH_ESCAPE
    # ListTools: read still runs on the workers (only its small files run here; their events say so).
    listed = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=events[0].session_id),
                                             timeout=RPC_TIMEOUT)
    assert {tool.spec.name: tool.runner for tool in listed.tools}["read"] == session_pb2.TOOL_RUNNER_WORKERS


@pytest.mark.parametrize("overrides", [{"local_cheap_calls": False}, {"local_fallback": False}],
                         ids=["rule-off", "no-local-fallback"])
async def test_with_the_rule_off_or_no_query_tools_here_a_small_read_goes_to_a_worker(
    make_server, workspace: Path, tmp_path: Path, overrides: dict
) -> None:
    served = await make_server(local_workers=1, **overrides)
    await served.client.wait_workers(WORKER)
    model = scripted(tmp_path, [{"tool_calls": [call("read", "small", file_path="src/alpha.py")]}, {"text": "done"}])
    events = await served.client.send((await served.client.create(workspace, model)).session_id, "go")
    assert _started_on(events) == {"small": WORKER}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"local_query_tools": ["red"]}, "'red' is not one of this server's Query tools (glob, grep, list_files"),
        ({"local_query_tools": ["bash"]}, "'bash' is not one of this server's Query tools"),
        ({"local_query_tools": ["read"], "local_fallback": False}, "which --no-local-fallback forbids"),
        ({"local_query_tools": ["gpu_info"], "local_worker_tools": ["benchmarks.plugin_tools"]},
         "'gpu_info' runs only on workers labelled gpu=true, and the server carries no labels"),
    ],
    ids=["unknown", "execute-tool", "no-local-fallback", "needs-workers-labels"],
)
async def test_a_rule_the_server_cannot_follow_stops_it_before_it_listens(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", **overrides)
    server = CodelaneServer(config)
    with pytest.raises(ServerConfigError, match="--local-query-tools") as refused:
        await server.start()
    assert message in str(refused.value)
    assert server.port is None or server.port == 0
    assert not (tmp_path / "data").exists()


# A tool's required labels say what a host needs to run it (gpu_info: gpu=true), and the server
# carries none: with the tool's module given to the server (--tools, which is how local workers get
# it) and no worker carrying the labels, the server offered it and ran it in-process, as "local".
@pytest.mark.parametrize("local_workers", [0, 1], ids=["no-worker", "worker-without-the-labels"])
async def test_a_tool_that_needs_workers_labels_never_runs_in_the_server(
    make_server, workspace: Path, tmp_path: Path, local_workers: int
) -> None:
    served = await make_server(local_workers=local_workers, local_worker_tools=["benchmarks.plugin_tools"])
    client = served.client
    if local_workers:
        await client.wait_workers(WORKER)
    session = await client.create(workspace, scripted(tmp_path, [
        {"tool_calls": [call("gpu_info", "c_gpu"), call("noop", "c_noop")]}, {"text": "done"}]))
    listed = await client.sessions.ListTools(session_pb2.ListToolsRequest(session_id=session.session_id),
                                             timeout=RPC_TIMEOUT)
    tools = {tool.spec.name: tool for tool in listed.tools}
    # Offered only while a worker offers it, and then to run there alone.
    assert ("gpu_info" in tools) is bool(local_workers)
    if local_workers:
        assert tools["gpu_info"].runner == session_pb2.TOOL_RUNNER_WORKERS and not tools["gpu_info"].server_fallback
    assert tools["noop"].server_fallback

    events = await client.send(session.session_id, "go")
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result
                for e in events if kind(e) == "tool_call_finished"}
    gpu = finished["c_gpu"]
    assert gpu.error_kind == tools_pb2.ERROR_KIND_NO_WORKER and gpu.worker_id != "local", gpu
    assert "gpu worker pid" not in gpu.output and "labelled gpu=true" in gpu.output, gpu.output
    assert not finished["c_noop"].is_error  # the module's other tools run here as before
