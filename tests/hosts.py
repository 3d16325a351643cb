"""Test hosts on one machine: a worker on "another host" runs in its own network namespace, behind
a veth link, in a mount namespace where the server's workspace does not exist.

    with TestHost.create() as host:                 # or the `test_host` fixture
        server listens on host.server_address       # 10.231.N.1, the root namespace's end
        proc = host.spawn_worker(argv, hide=ws.parent)  # a tmpfs over ws.parent, in there only
        host.link_down(); host.link_up(); host.netem("delay 20ms loss 1%")
        host.blackhole(); host.clear()                  # up, but every packet dropped silently
        host.throttle("16kbit")                         # slow, nothing lost

Needs root and iproute2 (`ip`, `tc`, `nsenter`); `unavailable()` says why not, for a skip. Each
host takes a free 10.231.N.0/30 and names its namespace and links after this process and N, so
parallel test runs do not collide. Everything is removed on exit, failures included.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET = "10.231"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why test hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "test hosts need root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"test hosts need `{tool}` (apt-get install iproute2 util-linux)"
    name = f"clprobe{os.getpid()}"
    made = _run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return None


@dataclass
class TestHost:
    __test__ = False  # not a test class, whatever pytest thinks of its name

    index: int
    namespace: str
    outer: str
    inner: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def server_address(self) -> str:
        """The root namespace's end of the link: where the server listens for this host."""
        return f"{SUBNET}.{self.index}.1"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[TestHost]:
        taken = _run("ip", "-o", "-4", "addr").stdout
        candidates = [n for n in range(256) if f"{SUBNET}.{n}." not in taken]
        index = random.choice(candidates)
        tag = f"{os.getpid() % 100000}x{index}"
        host = cls(index, f"clh{tag}", f"clo{tag}", f"cli{tag}")
        try:
            host._setup()
            yield host
        finally:
            host.close()

    def _setup(self) -> None:
        _run("ip", "netns", "add", self.namespace)
        _run("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _run("ip", "link", "set", self.inner, "netns", self.namespace)
        _run("ip", "addr", "add", f"{self.server_address}/30", "dev", self.outer)
        _run("ip", "link", "set", self.outer, "up")
        self.exec("ip", "addr", "add", f"{self.address}/30", "dev", self.inner)
        self.exec("ip", "link", "set", self.inner, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.namespace, *argv, check=check)

    def spawn_worker(self, argv: Sequence[str], *, hide: Path, tmpfs: dict[Path, str] | None = None,
                     env: dict[str, str] | None = None, stderr=subprocess.PIPE) -> subprocess.Popen[bytes]:
        """Starts `python -m tool_worker ARGV` on this host, with a fresh tmpfs over `hide`, and
        over each `tmpfs` path one of the size given (e.g. "1m": a small disk)."""
        command = [sys.executable, "-m", "tool_worker", *argv]
        mounts = [f"mount -t tmpfs tmpfs {shlex.quote(str(hide))}"]
        mounts += [
            f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(path))}" for path, size in (tmpfs or {}).items()
        ]
        script = " && ".join([*mounts, f"exec {shlex.join(command)}"])
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script],
            stderr=stderr, env=env,
        )
        self.processes.append(process)
        return process

    def sees(self, process: subprocess.Popen[bytes], path: Path) -> bool:
        """Whether `process` (on this host) can stat `path`, asked from inside its namespaces."""
        probe = _run("nsenter", "-t", str(process.pid), "-m", "-n", "stat", str(path), check=False)
        return probe.returncode == 0

    def link_down(self) -> None:
        _run("ip", "link", "set", self.outer, "down")

    def link_up(self) -> None:
        _run("ip", "link", "set", self.outer, "up")

    def blackhole(self) -> None:
        """The link stays up and carries nothing: every packet either way is dropped in silence (no
        FIN, no RST, no ICMP, ARP included), by a queue with no room (pfifo, limit 0) on both ends,
        which needs no netem."""
        self.exec("tc", "qdisc", "replace", "dev", self.inner, "root", "pfifo", "limit", "0")
        _run("tc", "qdisc", "replace", "dev", self.outer, "root", "pfifo", "limit", "0")

    def throttle(self, rate: str) -> None:
        """Caps what the host sends at `rate` (e.g. "16kbit"): a slow link that loses nothing (a token
        bucket whose burst passes a whole packet and whose queue holds a minute; needs no netem)."""
        self.exec("tc", "qdisc", "replace", "dev", self.inner, "root", "tbf", "rate", rate, "burst", "16kbit",
                  "latency", "60s")

    def clear(self) -> None:
        """Undoes blackhole(), throttle() and netem(): the link carries everything again."""
        self.exec("tc", "qdisc", "del", "dev", self.inner, "root", check=False)
        _run("tc", "qdisc", "del", "dev", self.outer, "root", check=False)

    def netem(self, spec: str) -> str | None:
        """Adds latency/loss to the host's side of the link; the reason when the kernel cannot."""
        result = self.exec("tc", "qdisc", "replace", "dev", self.inner, "root", "netem", *spec.split(), check=False)
        return None if result.returncode == 0 else f"netem is unavailable here: {result.stderr.strip()}"

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()
        _run("ip", "link", "del", self.outer, check=False)
        _run("ip", "netns", "del", self.namespace, check=False)


@pytest.fixture
def test_host() -> Iterator[TestHost]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with TestHost.create() as host:
        yield host
