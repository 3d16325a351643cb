"""No process outlives its call, its server's crash, or the restart after it (issue 12)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from codelane.v1 import events_pb2
from tests.polling import poll_until
from tests.processes import all_gone, command_names, pids_with
from tests.sandbox.conftest import Host, bash
from tests.session.conftest import Processes, kind, read_until, scripted
from tool_worker.confinement.cgroups import CgroupTree
from tool_worker.confinement.launcher import Sandbox
from tool_worker.confinement.policy import ResourceLimits

# Starts a sandbox the way the server does, then dies before letting it run: the window between
# spawning bwrap and unblocking it. Prints the host pid of the sandbox's first process.
_DIES_BEFORE_UNBLOCKING = """
import json, os, shutil, subprocess, sys
from pathlib import Path
from session_server.server import ServerConfig
from tool_worker.confinement import bwrap

settings = ServerConfig(data_dir=Path(sys.argv[1])).sandbox_settings()
workspace = Path(os.path.realpath(sys.argv[2]))
info_read, info_write = os.pipe()
block_read, block_write = os.pipe()
args, fds = bwrap.confined_args(
    shutil.which("bwrap"), ["sleep", sys.argv[3]], workspace=workspace, cwd=workspace,
    policy=settings.default_policy(), settings=settings, info_fd=info_write, block_fd=block_read,
    as_root=os.geteuid() == 0,
)
subprocess.Popen(args, pass_fds=(info_write, block_read, block_write, *fds), start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(info_write)
info = b""
while chunk := os.read(info_read, 4096):
    info += chunk
print(json.loads(info)["child-pid"], flush=True)
os._exit(0)
"""


async def _ended(pid: int, within: float = 10.0) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(pidfd, lambda: ended.done() or ended.set_result(None))
    try:
        await asyncio.wait_for(ended, within)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_kill9_of_the_server_ends_its_commands_and_a_restart_recovers(
    start_host: Any, processes: Processes, tmp_path: Path, mark: str
) -> None:
    host: Host = await start_host()
    slow = bash("slow", f"setsid sleep {mark} & sleep {mark}", timeout_ms=600_000)
    model = scripted(tmp_path, [{"text": "Slow.", "tool_calls": [slow]}, {"text": "Done."}])
    session = await host.client.create(host.workspace, model)
    stream = host.client.send_stream(session.session_id, "go")
    await read_until(stream, lambda r: kind(r.event) == "tool_call_started", [])
    await poll_until(lambda: len(pids_with(mark)) == 2, what="both sleeps to start")

    host.server.kill9()
    stream.cancel()
    assert await all_gone(mark), "a sandboxed process outlived the server"

    restarted = await processes.start_server(host.data_dir, local_workers=0)
    assert restarted.client is not None
    events, _ = await restarted.client.watch(session.session_id)
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_INTERRUPTED
    quick = scripted(tmp_path, [{"text": "Quick.", "tool_calls": [bash("quick", "echo back")]}, {"text": "Done."}],
                     name="quick.yaml")
    fresh = await restarted.client.create(host.workspace, quick)
    turn = await restarted.client.send(fresh.session_id, "again")
    finished = [e.tool_call_finished for e in turn if kind(e) == "tool_call_finished"]
    assert [f.result.output for f in finished] == ["back"]


@pytest.mark.parametrize("next_server", ["the same server, restarted", "any other server"])
async def test_a_sandbox_its_crashed_server_left_waiting_is_ended(
    processes: Processes, tmp_path: Path, mark: str, next_server: str
) -> None:
    data_dir, where = tmp_path / "data", tmp_path / "ws"
    where.mkdir()
    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIES_BEFORE_UNBLOCKING, str(data_dir), str(where), mark,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(helper.communicate(), 30)
    assert helper.returncode == 0
    left = int(stdout)
    try:
        # The sandbox outlived its parent, waiting on a block pipe it holds both ends of: its
        # command never ran, and would not, however long it waits.
        assert left in pids_with(mark), "the sandbox's first process is not waiting"
        commands = command_names(mark)
        assert "sleep" not in commands and "bwrap" in commands
        await processes.start_server(data_dir if next_server.startswith("the same") else tmp_path / "other",
                                     local_workers=0)
        assert await _ended(left), f"{next_server} did not end the sandbox a crash left"
    finally:
        if not await _ended(left, within=0):
            os.kill(left, 9)


@pytest.mark.skipif(os.geteuid() != 0, reason="per-call cgroups are used when the server runs as root")
async def test_restart_removes_the_cgroups_of_calls_a_crash_left(
    processes: Processes, tmp_path: Path, mark: str
) -> None:
    data_dir = tmp_path / "data"
    from session_server.server import ServerConfig

    owner = ServerConfig(data_dir=data_dir).sandbox_settings().owner
    tree = CgroupTree(owner)
    tree.prepare()
    leftover = tree.create(ResourceLimits())
    sleeper = await asyncio.create_subprocess_exec("sleep", mark, start_new_session=True)
    leftover.join(sleeper.pid)
    directories = list(leftover._dirs.values())
    await processes.start_server(data_dir, local_workers=0)
    assert await asyncio.wait_for(sleeper.wait(), 10) == -9
    assert [d for d in directories if d.exists()] == []


_LEAVES_A_CALL_CGROUP = """
import sys
from tool_worker.confinement.cgroups import CgroupTree
from tool_worker.confinement.policy import ResourceLimits
tree = CgroupTree(sys.argv[1])
tree.prepare()
print(tree.create(ResourceLimits())._dirs["pids"])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="per-call cgroups are used when the server runs as root")
def test_any_server_removes_the_call_cgroups_of_servers_gone(tmp_path: Path) -> None:
    # Only a server of the same data dir removed them: a killed server of a data dir used once
    # (a test's, a job's) left its calls' cgroups, and their parent, for good.
    # A live server's call, its sandbox not in it yet: empty too, and kept.
    live_tree = CgroupTree(f"live-{tmp_path.name}")
    live_tree.prepare()
    live = live_tree.create(ResourceLimits())
    try:
        gone = subprocess.run([sys.executable, "-c", _LEAVES_A_CALL_CGROUP, f"gone-{tmp_path.name}"],
                              capture_output=True, text=True, timeout=30)
        assert gone.returncode == 0, gone.stderr
        left = Path(gone.stdout.strip())
        assert left.is_dir()
        CgroupTree(f"starting-{tmp_path.name}").prepare()
        assert not left.exists() and not left.parent.exists()
        assert all(directory.is_dir() for directory in live._dirs.values())
    finally:
        live.remove()
        live_tree.remove_parents()
        CgroupTree(f"starting-{tmp_path.name}").remove_parents()


async def test_a_stopped_server_leaves_no_sandbox_behind(make_server: Any, workspace: Path, tmp_path: Path) -> None:
    started = await make_server()
    model = scripted(tmp_path, [{"text": "Run.", "tool_calls": [bash("one", "echo one")]}, {"text": "Done."}])
    session = await started.client.create(workspace, model)
    events = await started.client.send(session.session_id, "go")
    assert any(kind(e) == "tool_call_finished" for e in events)
    owner = started.server.sandbox.settings.owner
    # A sandbox was built ahead for the session's next call; stopping the server ends it.
    await started.server.stop(grace=0.5)
    leftovers = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit() and _carries(entry.name, owner)]
    assert leftovers == []


def _carries(pid: str, owner: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"CODELANE_SANDBOX_OWNER\0{owner}/".encode() in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False



def _owned(owner: str) -> list[str]:
    return [entry.name for entry in os.scandir("/proc") if entry.name.isdigit() and _carries(entry.name, owner)]


def _argv_read(owner: str) -> int:
    """How many bytes the waiting shells of this owner's sandboxes (children of their bwrap) have
    read: their argv so far."""
    sandboxes = set(_owned(owner))
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                parent = f.read().rsplit(b")", 1)[1].split()[1].decode()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                shell = b"mapfile" in f.read()
            if parent in sandboxes and shell:
                with open(f"/proc/{entry.name}/io", "rb") as f:
                    total += int(f.read().split(b"rchar: ", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


async def test_a_command_cancelled_while_its_argv_is_handed_over_is_ended(tmp_path: Path, mark: str) -> None:
    # The sandbox's shell reads its argv from a pipe a byte at a time: a megabyte takes it about a
    # second. A call cancelled (or out of time) in that second left its command to run on, as
    # much of it as had arrived, unwatched until the server stopped.
    sandbox = Sandbox()
    sandbox.start()
    owner = sandbox.settings.owner
    argv = ["bash", "-c", f"sleep {mark}", "--", *(["y" * 100_000] * 9)]
    starting = asyncio.create_task(
        sandbox.start_command(argv, workspace=tmp_path, cwd=tmp_path, policy=sandbox.settings.default_policy())
    )
    await poll_until(lambda: starting.done() or _argv_read(owner) > 0,
                     what="the sandbox's shell to read its argv", interval=0)
    assert not starting.done(), "the argv was taken whole before the cancel: nothing to check"
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert await all_gone(mark), "the command of a cancelled start runs on"
    assert _owned(owner) == []


async def test_a_call_cancelled_while_its_sandbox_built_ahead_is_checked_ends_that_sandbox(tmp_path: Path) -> None:
    # A repository with submodules has the layout of a sandbox built ahead checked in a thread. A
    # call cancelled (or out of time) meanwhile had taken that sandbox from the warm ones: it was
    # neither used nor ended, and waited for its argv until the server stopped.
    (tmp_path / ".git" / "modules").mkdir(parents=True)
    sandbox = Sandbox(keep_warm=True)
    sandbox.start()
    owner = sandbox.settings.owner
    policy = sandbox.settings.default_policy()
    first = await sandbox.start_command(["true"], workspace=tmp_path, cwd=tmp_path, policy=policy)
    os.close(first.output_fd)
    await first.close()
    await sandbox.warmed()
    assert _owned(owner), "no sandbox was built ahead: nothing to check"
    checking, release = threading.Event(), threading.Event()
    layout = sandbox._layout

    def held_layout(*arguments: Any) -> Any:
        checking.set()
        release.wait()
        return layout(*arguments)

    sandbox._layout = held_layout  # type: ignore[method-assign]
    starting = asyncio.create_task(sandbox.start_command(["true"], workspace=tmp_path, cwd=tmp_path, policy=policy))
    try:
        await poll_until(checking.is_set, what="the layout check of the sandbox built ahead", interval=0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
    finally:
        release.set()
    await poll_until(lambda: not _owned(owner), what="the sandbox built ahead to end")
    await sandbox.aclose()
