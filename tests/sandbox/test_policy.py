"""The sandbox policy over the API: defaults filled in and echoed, out-of-range requests refused
with INVALID_ARGUMENT naming the field (and nothing created), and a host that cannot confine
refusing every command instead of running it unconfined."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.v1 import session_pb2, tools_pb2
from session_server.store import SessionRecord, Store
from tests.sandbox.conftest import Host, bash
from tests.session.conftest import Client, kind, rpc_error, scripted
from tool_worker.confinement.bwrap import env_args
from tool_worker.confinement.policy import DEFAULT_MAX_MEMORY, DEFAULT_MAX_PROCESSES

S = session_pb2


def _policy(**fields: Any) -> S.SandboxPolicy:
    limits = fields.pop("limits", None)
    policy = S.SandboxPolicy(**fields)
    if limits is not None:
        policy.limits.CopyFrom(S.SandboxLimits(**limits))
    return policy


INVALID = [
    ("off-not-allowed", {"sandbox": _policy(mode=S.SANDBOX_MODE_OFF)}, "config.sandbox.mode"),
    ("unknown-mode", {"sandbox": _policy(mode=9)}, "config.sandbox.mode"),
    ("network-not-allowed", {"sandbox": _policy(network=S.SANDBOX_NETWORK_ON)}, "config.sandbox.network"),
    ("unknown-network", {"sandbox": _policy(network=7)}, "config.sandbox.network"),
    ("too-many-processes", {"sandbox": _policy(limits={"max_processes": DEFAULT_MAX_PROCESSES + 1})},
     "config.sandbox.limits.max_processes"),
    ("too-few-processes", {"sandbox": _policy(limits={"max_processes": 2})}, "config.sandbox.limits.max_processes"),
    ("negative-memory", {"sandbox": _policy(limits={"max_memory_bytes": -1})},
     "config.sandbox.limits.max_memory_bytes"),
    ("too-much-memory", {"sandbox": _policy(limits={"max_memory_bytes": DEFAULT_MAX_MEMORY * 2})},
     "config.sandbox.limits.max_memory_bytes"),
    ("cpu-over-the-server's", {"sandbox": _policy(limits={"max_cpu_time": duration_pb2.Duration(seconds=10**6)})},
     "config.sandbox.limits.max_cpu_time"),
    ("cpu-under-a-second", {"sandbox": _policy(limits={"max_cpu_time": duration_pb2.Duration(nanos=500_000_000)})},
     "config.sandbox.limits.max_cpu_time"),
    ("cpu-a-nanosecond", {"sandbox": _policy(limits={"max_cpu_time": duration_pb2.Duration(nanos=1)})},
     "config.sandbox.limits.max_cpu_time"),
    ("cpu-not-whole-seconds", {"sandbox": _policy(limits={"max_cpu_time": duration_pb2.Duration(seconds=2, nanos=1)})},
     "config.sandbox.limits.max_cpu_time"),
    ("few-open-files", {"sandbox": _policy(limits={"max_open_files": 3})}, "config.sandbox.limits.max_open_files"),
    ("env-bad-name", {"env": {"NOT A NAME": "x"}}, "config.env['NOT A NAME']"),
    ("env-leading-digit", {"env": {"1X": "x"}}, "config.env['1X']"),
    ("env-nul", {"env": {"X": "a\0b"}}, "config.env['X']"),
    ("env-too-many", {"env": {f"V{i}": "x" for i in range(101)}}, "config.env"),
    ("env-too-big", {"env": {"BIG": "x" * (65 * 1024)}}, "config.env"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_out_of_range_policies_are_refused_naming_the_field(
    make_server: Any, workspace: Path, tmp_path: Path, config: dict[str, Any], field: str
) -> None:
    client: Client = (await make_server()).client
    model = scripted(tmp_path, [{"text": "hi"}])
    error = await rpc_error(client.create(workspace, model, **config))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}, error
    assert await client.count_sessions() == 0


async def test_defaults_are_filled_in_and_a_chosen_policy_round_trips(
    make_server: Any, workspace: Path, tmp_path: Path
) -> None:
    client: Client = (await make_server(allow_unsandboxed=True, sandbox_allow_network=True)).client
    model = scripted(tmp_path, [{"text": "hi"}])
    plain = await client.create(workspace, model)
    assert plain.config.sandbox.mode == S.SANDBOX_MODE_WORKSPACE_WRITE
    assert plain.config.sandbox.network == S.SANDBOX_NETWORK_OFF
    assert plain.config.sandbox.limits.max_processes == DEFAULT_MAX_PROCESSES
    assert plain.config.sandbox.limits.max_memory_bytes == DEFAULT_MAX_MEMORY

    chosen = _policy(mode=S.SANDBOX_MODE_READ_ONLY, network=S.SANDBOX_NETWORK_ON,
                     limits={"max_processes": 64, "max_cpu_time": duration_pb2.Duration(seconds=5)})
    session = await client.create(workspace, model, sandbox=chosen, env={"PROJECT_MODE": "ci"})
    again = await client.get(session.session_id)
    for got in (session, again):
        assert got.config.sandbox.mode == S.SANDBOX_MODE_READ_ONLY
        assert got.config.sandbox.network == S.SANDBOX_NETWORK_ON
        assert got.config.sandbox.limits.max_processes == 64
        assert got.config.sandbox.limits.max_cpu_time.seconds == 5
        assert dict(got.config.env) == {"PROJECT_MODE": "ci"}
    off = await client.create(workspace, model, sandbox=_policy(mode=S.SANDBOX_MODE_OFF))
    assert off.config.sandbox.mode == S.SANDBOX_MODE_OFF


async def test_session_env_reaches_commands_and_network_on_reaches_the_host(
    start_host: Any, tmp_path: Path, listener: Any
) -> None:
    host: Host = await start_host(args=("--sandbox-allow-network",))
    calls = [
        bash("env", "printenv PROJECT_MODE"),
        bash("connect", f"exec 3<>/dev/tcp/127.0.0.1/{listener.port} && echo connected"),
    ]
    results = await host.run(tmp_path, calls, env={"PROJECT_MODE": "ci"},
                             sandbox=_policy(network=S.SANDBOX_NETWORK_ON))
    assert results["env"].output == "ci"
    assert results["connect"].output == "connected" and listener.accepted == 1


async def test_session_env_reaches_the_command_never_bubblewrap_itself(start_host: Any, tmp_path: Path) -> None:
    # bwrap starts on the host, before it confines anything, and its dynamic loader reads its
    # environment there: a session's LD_PRELOAD in it ran code with the server's rights (it read a
    # file outside the sandbox). In the sandbox, pid 1 is bwrap's own init: /proc/1/environ shows
    # the environment bwrap was started with.
    host: Host = await start_host()
    calls = [
        bash("command", "printenv PROJECT_MODE"),
        bash("bwrap", "tr '\\0' '\\n' < /proc/1/environ | grep -c PROJECT_MODE; true"),
        bash("bwrap-runs", "tr '\\0' '\\n' < /proc/1/environ | grep -c ^PATH="),
    ]
    results = await host.run(tmp_path, calls, env={"PROJECT_MODE": "ci"})
    assert results["command"].output == "ci"
    assert results["bwrap-runs"].output == "1"  # the probe reads bwrap's environment
    assert results["bwrap"].output == "0"


async def test_without_bubblewrap_commands_fail_closed(processes: Any, tmp_path: Path, workspace: Path) -> None:
    # A server that finds no bwrap on its PATH: as on a host where bubblewrap is not installed.
    server = await processes.start_server(tmp_path / "data", local_workers=0, env={"PATH": str(tmp_path / "empty")})
    assert "sandbox: UNAVAILABLE (bubblewrap (bwrap) is not installed" in server.log()
    model = scripted(tmp_path, [{"text": "Try.", "tool_calls": [bash("try", f"touch {tmp_path}/ran")]},
                                {"text": "Done."}])
    assert server.client is not None
    session = await server.client.create(workspace, model)
    events = await server.client.send(session.session_id, "go")
    result = next(e.tool_call_finished.result for e in events if e.WhichOneof("kind") == "tool_call_finished")
    assert result.error_kind == tools_pb2.ERROR_KIND_SANDBOX_UNAVAILABLE
    assert "apt-get install bubblewrap" in result.output and "--sandbox off --allow-unsandboxed" in result.output
    assert json.loads(result.metadata_json)["sandbox"] == "workspace-write"
    assert not (tmp_path / "ran").exists()


def test_a_nul_in_a_variable_never_reaches_bubblewraps_arguments() -> None:
    # The configuration refuses it first; here it would end one --setenv pair and start options.
    with pytest.raises(ValueError, match="NUL"):
        env_args((("X", "a\0--bind\0/\0/"),), [])


async def test_a_session_stored_before_sandboxes_existed_takes_the_servers_default_policy(
    processes: Any, tmp_path: Path, workspace: Path
) -> None:
    """A session a server before the sandbox (before 2026-12-03) stored has no policy: an upgraded
    server gave it workspace-write whatever its --sandbox, so `--sandbox read-only` let the old
    sessions write (and `--sandbox off`, on a host without bubblewrap, left their commands unable
    to run), while a session created then took the operator's default."""
    model = scripted(tmp_path, [{"text": "Trying.", "tool_calls": [bash("c1", "echo old > written.txt")]},
                                {"text": "Done."}])
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = Store(data_dir / "codelane.db")
    # The configuration as that server stored it: no "sandbox", no "max_output_tokens".
    old_config = {
        "model": model, "system_prompt": "You are a coding agent.", "max_turns": 50, "query_concurrency": 8,
        "query_timeout": 60.0, "execute_timeout": 600.0, "max_attempts": 3, "query_mode": "internal",
        "execute_mode": "internal", "external_task_timeout": 600.0,
        "permissions": {"allow": [], "deny": [], "ask": [], "default_action": "allow",
                        "confirmation_timeout": 60.0, "timeout_action": "deny"},
    }
    store.create_session(SessionRecord("s_old", str(workspace), old_config, created=1.0, updated=1.0))
    store.close()

    server = await processes.start_server(data_dir, local_workers=0, args=("--sandbox", "read-only"))
    client: Client = server.client
    assert (await client.get("s_old")).config.sandbox.mode == S.SANDBOX_MODE_READ_ONLY
    events = await client.send("s_old", "go")
    [result] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
    assert json.loads(result.metadata_json)["sandbox"] == "read-only", result
    assert not (workspace / "written.txt").exists()
