"""Resource limits of each call, through a real server: the call ends, its result names the
limit, nothing it started is left, and the server goes on. The same kind of command within the
limits succeeds, so the limit is what stopped it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from codelane.v1 import tools_pb2
from tests.processes import all_gone
from tests.sandbox.conftest import Host, bash, sandbox_config

# The interpreter itself, not a virtual environment's link to it: a venv under /tmp (as CI makes)
# is hidden by the sandbox's private /tmp.
REAL_PYTHON = os.path.realpath(sys.executable)


def _limits_hit(result: tools_pb2.ToolResult) -> list[str]:
    return json.loads(result.metadata_json).get("limits_hit", [])


async def test_fork_bomb_ends_and_the_server_lives(start_host: Any, tmp_path: Path, mark: str) -> None:
    host: Host = await start_host()
    bomb = f"bomb() {{ sleep {mark} & bomb | bomb & }}; bomb; wait"
    results = await host.run(
        tmp_path, [bash("bomb", bomb, timeout_ms=5000), bash("after", "echo still here")],
        **sandbox_config(max_processes=32),
    )
    bombed = results["bomb"]
    assert bombed.error_kind == tools_pb2.ERROR_KIND_RESOURCE_LIMIT, bombed
    assert "processes" in _limits_hit(bombed)
    assert "the process limit (32 processes) was reached" in bombed.output
    assert await all_gone(mark)
    assert results["after"].output == "still here"
    assert host.server.proc.poll() is None


async def test_memory_hog_is_killed_and_smaller_allocations_run(start_host: Any, tmp_path: Path) -> None:
    host: Host = await start_host()
    allocate = f"{REAL_PYTHON} -c \"data = b'x' * ({{}} << 20); print(len(data) >> 20, 'MiB')\""
    results = await host.run(
        tmp_path,
        [bash("hog", allocate.format(512)), bash("modest", allocate.format(16))],
        **sandbox_config(max_memory_bytes=128 << 20),
    )
    hog = results["hog"]
    assert hog.error_kind == tools_pb2.ERROR_KIND_RESOURCE_LIMIT, hog
    assert _limits_hit(hog) == ["memory"]
    assert "the memory limit (128 MiB) was reached" in hog.output
    assert results["modest"].output == "16 MiB" and not results["modest"].is_error


async def test_cpu_time_limit_names_itself(start_host: Any, tmp_path: Path) -> None:
    host: Host = await start_host()
    from google.protobuf import duration_pb2

    results = await host.run(
        tmp_path,
        [bash("spin", "while :; do :; done", timeout_ms=30_000), bash("limits", "ulimit -t; ulimit -n")],
        **sandbox_config(max_cpu_time=duration_pb2.Duration(seconds=1), max_open_files=64),
    )
    spin = results["spin"]
    assert spin.error_kind == tools_pb2.ERROR_KIND_RESOURCE_LIMIT, spin
    assert _limits_hit(spin) == ["cpu_time"]
    assert "CPU-time limit (1 s)" in spin.output
    assert results["limits"].output.split() == ["1", "64"]


async def test_background_processes_end_with_their_call_in_every_mode(
    start_host: Any, tmp_path: Path, mark: str
) -> None:
    leave = (
        f"sleep {mark} & setsid sleep {mark} & (sleep {mark} &) ; "
        f"nohup sleep {mark} >/dev/null 2>&1 & disown; echo left"
    )
    for off in (False, True):
        host: Host = await start_host(off=off)
        results = await host.run(tmp_path, [bash("leave", leave)])
        assert results["leave"].output == "left"
        assert await all_gone(mark), f"a background process outlived its call (off={off})"


async def test_setsid_escapes_neither_the_timeout_nor_the_call(start_host: Any, tmp_path: Path, mark: str) -> None:
    host: Host = await start_host()
    results = await host.run(tmp_path, [bash("stuck", f"setsid sleep {mark} & sleep {mark}", timeout_ms=1000)])
    assert results["stuck"].error_kind == tools_pb2.ERROR_KIND_TIMEOUT
    assert await all_gone(mark)
