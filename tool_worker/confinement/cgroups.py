"""Per-call cgroups (v1 `pids` and `memory` controllers): limits on everything a call starts
together, and the counters that tell which limit stopped it.

Used when the server runs as root, where RLIMIT_NPROC does not apply (root is exempt) and
RLIMIT_AS would only bound each process on its own. Each call gets `<parent>/<call>` in both
hierarchies; its sandbox's first process is moved in before the command starts, so everything
the command forks is counted. `<parent>` is `codelane-sandbox/<owner id>`, so a restarted
server removes what a crash left behind, and any server the parents of servers gone, with their
calls that no process is in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tool_worker.confinement.policy import Limit, ResourceLimits

CONTROLLERS = ("pids", "memory")
_MOUNTINFO = "/proc/self/mountinfo"


class CgroupsUnavailable(Exception):
    """The v1 pids and memory hierarchies are missing or not writable; the message says which."""


def _v1_mounts() -> dict[str, Path]:
    """Mount point of each v1 controller hierarchy, from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    with open(_MOUNTINFO, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup":
                continue
            for option in fields[separator + 3].split(","):
                if option in CONTROLLERS:
                    mounts[option] = Path(fields[4])
    return mounts


def _own_path(controller: str) -> str:
    """This process's cgroup in a v1 hierarchy ("/" at its root)."""
    for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return "/"


@dataclass(frozen=True)
class CallUsage:
    """What a call's cgroups counted: forks refused at pids.max, processes the OOM killer ended."""

    refused_forks: int
    oom_kills: int

    def limits_hit(self) -> list[Limit]:
        hit = []
        if self.refused_forks:
            hit.append(Limit.PROCESSES)
        if self.oom_kills:
            hit.append(Limit.MEMORY)
        return hit


class CallCgroups:
    """One call's pair of cgroups: created with its limits, joined by the sandbox, then removed."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self._dirs = dirs

    def join(self, pid: int) -> None:
        for directory in self._dirs.values():
            (directory / "cgroup.procs").write_text(str(pid))

    def usage(self) -> CallUsage:
        events = _keyed(self._dirs["pids"] / "pids.events")
        oom = _keyed(self._dirs["memory"] / "memory.oom_control")
        return CallUsage(refused_forks=events.get("max", 0), oom_kills=oom.get("oom_kill", 0))

    def remove(self) -> None:
        """Removes both cgroups; any process still inside (there should be none) is killed first."""
        for directory in self._dirs.values():
            _remove(directory)


class CgroupTree:
    """This server's parent cgroups, one per controller, holding one child per running call."""

    def __init__(self, owner: str) -> None:
        mounts = _v1_mounts()
        missing = [c for c in CONTROLLERS if c not in mounts]
        if missing:
            raise CgroupsUnavailable(
                f"the cgroup v1 {' and '.join(missing)} controller{'s are' if len(missing) > 1 else ' is'} "
                "not mounted (codelane needs v1 pids and memory hierarchies, e.g. /sys/fs/cgroup/pids)"
            )
        self._parents = {c: mounts[c] / _own_path(c).lstrip("/") / "codelane-sandbox" / owner for c in CONTROLLERS}
        self._counter = 0

    def prepare(self) -> None:
        """Creates the parents, removes the calls a previous run of this server left behind, and
        the parents of servers gone, with the calls they left that no process is in (a running
        server re-creates its own parent when it needs it)."""
        for parent in self._parents.values():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupsUnavailable(f"cannot create {parent}: {exc.strerror}") from None
            for child in parent.iterdir():
                if child.is_dir():
                    _remove(child)
            for other in parent.parent.iterdir():
                if other.is_dir() and other != parent:
                    # A killed server's calls stayed until a server of its own data dir started,
                    # so servers of data dirs used once (a test's, a job's) left theirs for good.
                    for child in other.iterdir():
                        if child.is_dir() and _made_by_a_process_gone(child.name):
                            with contextlib.suppress(OSError):  # EBUSY while a process is in it
                                child.rmdir()
                    with contextlib.suppress(OSError):
                        other.rmdir()

    def remove_parents(self) -> None:
        """Removes the parents when no call is left in them (a server stopping)."""
        for parent in self._parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()

    def create(self, limits: ResourceLimits) -> CallCgroups:
        self._counter += 1
        name = f"call-{os.getpid()}-{self._counter}"
        dirs: dict[str, Path] = {}
        try:
            for controller, parent in self._parents.items():
                directory = parent / name
                for attempt in range(3):
                    # Another server's start removes parents that are empty when it looks.
                    parent.mkdir(exist_ok=True)
                    try:
                        directory.mkdir()
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
                dirs[controller] = directory
            (dirs["pids"] / "pids.max").write_text(str(limits.processes))
            memory = dirs["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            # With swap accounting on, the same bound covers memory and swap together.
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limits.memory_bytes))
        except BaseException:
            CallCgroups(dirs).remove()
            raise
        return CallCgroups(dirs)


def _made_by_a_process_gone(call: str) -> bool:
    """Whether the server that made the call's cgroup (`call-<pid>-<n>`, see `create`) is gone: a
    live server's may be empty only because its sandbox is not in it yet."""
    parts = call.split("-")
    return len(parts) == 3 and parts[1].isdigit() and not os.path.exists(f"/proc/{parts[1]}")


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup file of "key value" lines as a dict."""
    values = {}
    for line in path.read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _remove(directory: Path) -> None:
    for _ in range(100):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        # Killed processes leave their cgroup when they have exited, a moment later.
        time.sleep(0.01)
    directory.rmdir()
