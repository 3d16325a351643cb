"""As a user other than root, limits are rlimits inside bubblewrap's user namespace: the same
sandbox, run by `nobody` (the suite itself runs as root in CI)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

import tool_worker

_REPO = Path(tool_worker.__file__).resolve().parent.parent
_SITE = Path(sysconfig.get_paths()["purelib"])

def _world_usable(path: Path) -> bool:
    """Whether `nobody` can reach and read `path` (every parent searchable by others)."""
    return path.exists() and all(p.stat().st_mode & stat.S_IXOTH for p in path.parents) and bool(
        path.stat().st_mode & stat.S_IROTH
    )


# This interpreter, or the system's of the same version (a venv's may live under /root).
_PYTHON = next(
    (p for p in (Path(os.path.realpath(sys.executable)), Path(f"/usr/bin/python{sys.version_info[0]}."
                                                              f"{sys.version_info[1]}")) if _world_usable(p)),
    None,
)

_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from tool_worker.confinement.launcher import Sandbox
from tool_worker.confinement.policy import ResourceLimits, SandboxPolicy, SandboxSettings
from tool_worker.registry import ToolRegistry

async def main():
    sandbox = Sandbox(SandboxSettings(owner="non-root-test"))
    registry = ToolRegistry.builtin(sandbox)
    policy = SandboxPolicy(limits=ResourceLimits(processes=16, memory_bytes=128 << 20, cpu_seconds=1,
                                                 open_files=64))
    out = {"describe": sandbox.describe()}
    commands = [
        ("id", "id -u; ulimit -u; ulimit -v; ulimit -t; ulimit -n"),
        ("write", "echo ok > f && cat f"),
        ("escape", "echo x > /etc/codelane-test"),
        ("spin", "while :; do :; done"),
        # After the bomb the call's own shell runs builtins only: a fork of its own (say `sleep`)
        # would meet the same limit, and bash gives up the script when a fork fails. It waits
        # for the bomb's first failed fork (logged to bomb.log; `read -t` on a FIFO nobody
        # writes is its sleep) instead of racing it: under load, a fixed loop could end first.
        ("bomb", "mkfifo never; exec 3<>never; b() { b | b & }; b 2>bomb.log; "
                 "for ((i = 0; i < 600; i++)); do [[ -s bomb.log ]] && break; read -t 0.05 -u 3; done; "
                 "while IFS= read -r line; do echo $line; done < bomb.log; echo survived"),
    ]
    for name, command in commands:
        result = await registry.execute("bash", Path(sys.argv[1]), json.dumps({"command": command}), policy=policy)
        out[name] = {"output": result.output, "kind": result.error_kind and result.error_kind.value,
                     "metadata": result.metadata}
    print(json.dumps(out))

asyncio.run(main())
"""


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("bwrap") is None
    or _PYTHON is None or not all(_world_usable(p) for p in (_REPO, _SITE)),
    reason="needs root (to become nobody), setpriv, bwrap, and a Python and checkout that nobody can read",
)


async def test_limits_are_rlimits_in_a_user_namespace(tmp_path: Path) -> None:
    import json

    workspace = tmp_path / "ws"
    workspace.mkdir()
    for path in (tmp_path, workspace):
        path.chmod(0o777)
    # tmp_path's own parents are root's: a directory nobody can reach holds the workspace.
    reachable = Path("/tmp") / f"codelane-non-root-{os.getpid()}"
    reachable.mkdir(mode=0o777, exist_ok=True)
    reachable.chmod(0o777)
    try:
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
            "env", f"HOME={reachable}", "PATH=/usr/bin:/bin",
            f"PYTHONPATH={_REPO}:{_REPO / 'clients' / 'python'}:{_SITE}",
            str(_PYTHON), "-c", _SCRIPT, str(reachable),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=reachable,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, stderr.decode()
        out = json.loads(stdout)
    finally:
        shutil.rmtree(reachable, ignore_errors=True)
    assert "RLIMIT_NPROC in a user namespace" in out["describe"]
    assert out["id"]["output"].split() == ["65534", "16", str(128 << 10), "1", "64"]
    assert out["write"]["output"] == "ok"
    assert "Read-only file system" in out["escape"]["output"]
    assert out["spin"]["kind"] == "resource_limit" and out["spin"]["metadata"]["limits_hit"] == ["cpu_time"]
    # The bomb's forks fail at 16 processes; bash says so, and the call itself goes on.
    assert "fork" in out["bomb"]["output"] and "survived" in out["bomb"]["output"]
