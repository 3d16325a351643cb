"""Workspaces that travel: what syncing, snapshotting and reading on a synced copy cost.

    sudo python -m benchmarks.workspace_bench [--files 10000] [--megabytes 100] [--edits 30]

Needs root and iproute2 (the remote worker runs on a test host: its own network and mount
namespaces, tests/hosts.py). Everything is written to a new ext4 filesystem made for the run (a
sparse image file, loop-mounted; e2fsprogs), so that neither side inherits the other's or an
earlier run's deleted inodes: on a journal-less ext4 (this development VM's root) the kernel skips
free inodes deleted in the last minutes when it allocates one, and creating 10,000 files after a
run that deleted as many took 5 s instead of 0.3 s, for `tar` as for codelane
(`--filesystem tmp` measures in the system's temporary directory instead). Prints, side by side
from one run:

1. cold sync of a generated tree to a new worker over a veth link, beside `tar` of the same tree
   piped through a TCP socket over the same link (target: ratio <= 1.5), with the CPU seconds
   (user/system) each round cost the server, the remote worker and both tars;
2. a snapshot of the unchanged tree with a warm stat cache, watched (inotify) and stat-everything
   (target: <= 50 ms);
3. after a one-file edit, the next `read` on the synced remote worker and on a shared-filesystem
   worker (same host), p50 over --edits edits (target: <= 10 ms more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import count
from session_server.pool import QueryCall
from session_server.server import CodelaneServer, ServerConfig
from tests.hosts import TestHost, unavailable
from tool_worker.merkle import SnapshotRef, TreeScanner

TOKEN = "bench-token"


def generate(root: Path, files: int, total_bytes: int) -> None:
    size = total_bytes // files
    for i in range(files):
        directory = root / f"pkg{i % 100:02d}" / f"mod{i % 7}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file{i}.py").write_bytes(os.urandom(size // 2).hex().encode()[:size])


def tar_over_tcp(host: TestHost, source: Path, destination: Path) -> float:
    """Seconds to copy `source` into `destination` (on the host) with tar through a socket."""
    destination.mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = (
        "import socket, subprocess, sys\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{host.address}', {port}))\n"
        "s.listen(1); print('ready', flush=True); c, _ = s.accept()\n"
        f"sys.exit(subprocess.run(['tar', '-x', '-C', '{destination}'], stdin=c.fileno()).returncode)\n"
    )
    receiving = subprocess.Popen(["ip", "netns", "exec", host.namespace, sys.executable, "-c", receiver],
                                 stdout=subprocess.PIPE, text=True)
    assert receiving.stdout is not None and receiving.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    with socket.create_connection((host.address, port)) as connection:
        subprocess.run(["tar", "-c", "-C", str(source), "."], stdout=connection.fileno(), check=True)
    receiving.wait()
    return time.perf_counter() - started


def cpu_seconds(pid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds a process (None: this one) has used so far, all its threads."""
    if pid is None:
        times = os.times()
        return times.user, times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def children_cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def used(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


async def read(server: CodelaneServer, ws: Path, snapshot: SnapshotRef, file_path: str, where: str) -> float:
    started = time.perf_counter()
    result = await server.pool.dispatch(QueryCall(
        session_id="bench", call_id="r", tool_name="read", workspace=str(ws), snapshot=snapshot, timeout=600,
        arguments_json=json.dumps({"file_path": file_path, "limit": 5}), required_labels={"where": where},
    ))
    elapsed = time.perf_counter() - started
    if result.is_error:
        raise RuntimeError(f"read on the {where} worker failed: {result.output}")
    return elapsed


async def current(server: CodelaneServer, ws: Path) -> SnapshotRef:
    snapshot = await server.snapshots.of(str(ws)).current()
    return SnapshotRef(str(ws), snapshot.digest, snapshot.times_digest)


@contextlib.contextmanager
def fresh_filesystem(trees: int, files: int, total_bytes: int) -> Iterator[Path]:
    """A new ext4 filesystem big enough for `trees` copies of the generated tree, mounted for the
    run and removed after it."""
    block = 4096
    per_tree = files * (-(-(total_bytes // files) // block) * block) + files // 10 * block
    size = max(1 << 30, int(per_tree * trees * 1.5))
    scratch = Path(tempfile.mkdtemp(prefix="codelane-workspace-fs-"))
    image, mountpoint = scratch / "ext4.img", scratch / "mnt"
    try:
        mountpoint.mkdir()
        with open(image, "wb") as handle:
            handle.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(files * trees * 2), str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
                # Busy (a process of the run still holds a file there): detached now, so that the
                # removal below cannot reach into it; the loop device goes when it is let go.
                subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def main_async(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        directory = None
        if args.filesystem == "fresh":
            # The server's tree, the remote worker's copies and the tars' copies.
            directory = stack.enter_context(fresh_filesystem(2 * args.rounds + 3, args.files, args.megabytes * 10**6))
            print(f"filesystem: a new ext4 mounted at {directory}")
        else:
            print(f"filesystem: {tempfile.gettempdir()}")
        await measure(args, Path(tempfile.mkdtemp(prefix="codelane-workspace-bench-", dir=directory)))


async def measure(args: argparse.Namespace, base: Path) -> None:
    worker_log = subprocess.DEVNULL
    if args.worker_log:
        worker_log = os.open(args.worker_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    ws = base / "server" / "ws"
    generate(ws, args.files, args.megabytes * 1_000_000)
    print(f"tree: {args.files} files, {args.megabytes} MB, in {ws}")
    with TestHost.create() as host:
        server = CodelaneServer(ServerConfig(
            listen="127.0.0.1:0", extra_listen=[f"{host.server_address}:0"], data_dir=base / "data",
            worker_token=TOKEN, local_workers=0, local_fallback=False,
        ))
        await server.start()
        local = None
        try:
            snapshot = await current(server, ws)
            remote = host.spawn_worker(
                ["--connect", f"{host.server_address}:{server.ports[1]}", "--token", TOKEN, "--id", "remote",
                 "--labels", "where=remote", "--cache-dir", str(base / "remote-cache"), "--log-level", "INFO"],
                hide=base / "server", stderr=worker_log,
            )
            local = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{server.port}", "--token", TOKEN,
                 "--id", "local", "--labels", "where=shared", "--root", str(ws.parent),
                 "--cache-dir", str(base / "local-cache")], stderr=subprocess.DEVNULL,
            )
            while {w.worker_id for w in server.pool.workers()} != {"remote", "local"}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert remote.poll() is None

            # 1. cold sync vs tar over TCP, same link, alternating (the disk's speed drifts with
            # what else runs): each round syncs a new workspace of the same files (hard links),
            # which the worker has never seen, and tars the tree to a new directory.
            # CPU seconds beside the wall times: the server (this process), the remote worker, and
            # both tars; they vary far less with the other jobs on the machine than wall times do.
            syncs, tars, sync_cpu, tar_cpu = [], [], [], []
            for round_ in range(args.rounds):
                copy = ws.parent / f"copy{round_}"
                await asyncio.to_thread(subprocess.run, ["cp", "-al", str(ws), str(copy)], check=True)
                copy_snapshot = await current(server, copy)
                # Each side starts with nothing dirty: the writeback of the earlier rounds' gigabyte
                # would otherwise throttle whichever side comes next.
                await asyncio.to_thread(os.sync)
                before = cpu_seconds(), cpu_seconds(remote.pid)
                syncs.append(await read(server, copy, copy_snapshot, "pkg00/mod0/file0.py", "remote"))
                sync_cpu.append((used(before[0], cpu_seconds()), used(before[1], cpu_seconds(remote.pid))))
                await asyncio.to_thread(os.sync)
                before_tar = children_cpu_seconds()
                tars.append(await asyncio.to_thread(tar_over_tcp, host, ws, base / f"tar-copy{round_}"))
                tar_cpu.append(used(before_tar, children_cpu_seconds()))
            sync, tar = statistics.median(syncs), statistics.median(tars)
            await read(server, ws, snapshot, "pkg00/mod0/file0.py", "remote")
            # 2. snapshot of the unchanged tree, warm stat cache.
            snapshots = server.snapshots.of(str(ws))
            watched = []
            for _ in range(20):
                started = time.perf_counter()
                snapshots.changed()
                await snapshots.current()
                watched.append(time.perf_counter() - started)
            scanner = TreeScanner(str(ws), watch=False)
            scanner.scan()
            full = []
            for _ in range(5):
                started = time.perf_counter()
                scanner.scan()
                full.append(time.perf_counter() - started)
            # 3. one-file edit, then the next read on each worker.
            await read(server, ws, snapshot, "pkg00/mod0/file0.py", "shared")  # the shared worker's first scan
            synced_reads, shared_reads = [], []
            target = ws / "pkg42" / "mod0" / "file42.py"
            for i in range(args.edits):
                target.write_text(f"edit {i}\n" + "x" * 100)
                snapshots.changed()
                snapshot = await current(server, ws)
                pairs = [("remote", synced_reads), ("shared", shared_reads)]
                for where, times in pairs if i % 2 else reversed(pairs):
                    times.append(await read(server, ws, snapshot, str(target), where))
        finally:
            if local is not None:
                local.kill()
                local.wait()
            await server.stop(grace=0.5)
    shutil.rmtree(base, ignore_errors=True)
    if args.worker_log:
        os.close(worker_log)

    ms = 1000.0
    print("cold sync rounds (s): " + ", ".join(f"{a:.2f} vs tar {b:.2f}" for a, b in zip(syncs, tars, strict=True)))
    print("CPU seconds per round (user/system), server + worker vs both tars: " + ", ".join(
        f"{server[0]:.2f}/{server[1]:.2f} + {worker[0]:.2f}/{worker[1]:.2f} vs {tar_[0]:.2f}/{tar_[1]:.2f}"
        for (server, worker), tar_ in zip(sync_cpu, tar_cpu, strict=True)))
    print()
    for line in figures_table(sync, tar, statistics.median(watched) * ms, statistics.median(full) * ms,
                              statistics.median(synced_reads) * ms, statistics.median(shared_reads) * ms):
        print(line)


# Issue 14's targets.
SYNC_RATIO_TARGET = 1.5
SNAPSHOT_TARGET_MS = 50.0
READ_EXTRA_TARGET_MS = 10.0


def figures_table(sync: float, tar: float, watched_ms: float, full_ms: float, synced_ms: float,
                  shared_ms: float) -> list[str]:
    """The three figures beside what they are compared with, each judged met or missed (the
    snapshot by the watched figure: the one the server takes)."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    ratio, extra = sync / tar, synced_ms - shared_ms
    return [
        f"{'figure':<62} {'codelane':>10} {'beside':>10} {'ratio/diff':>11} {'target':>8} verdict",
        f"{'cold sync to a new worker over veth / tar over TCP, median (s)':<62} {sync:>10.2f} {tar:>10.2f} "
        f"{ratio:>10.2f}x {f'<= {SYNC_RATIO_TARGET:g}x':>8} {verdict(ratio <= SYNC_RATIO_TARGET)}",
        f"{'snapshot, unchanged tree, warm cache, p50 (ms): watched / stat all':<62} "
        f"{watched_ms:>10.2f} {full_ms:>10.2f} {'':>11} {f'<= {SNAPSHOT_TARGET_MS:g}':>8} "
        f"{verdict(watched_ms <= SNAPSHOT_TARGET_MS)}",
        f"{'read after a one-file edit, p50 (ms): synced remote / shared FS':<62} {synced_ms:>10.2f} "
        f"{shared_ms:>10.2f} {extra:>+10.2f}ms {f'<= +{READ_EXTRA_TARGET_MS:g}':>8} "
        f"{verdict(extra <= READ_EXTRA_TARGET_MS)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=count, default=10_000)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="cold syncs and tar copies, alternating")
    parser.add_argument("--worker-log", help="write the remote worker's log (its sync timings) here")
    parser.add_argument("--filesystem", choices=("fresh", "tmp"), default="fresh",
                        help="where the trees are written: a new ext4 made for the run (default), or the "
                             "system's temporary directory")
    args = parser.parse_args()
    reason = unavailable()
    if reason is None and args.filesystem == "fresh" and shutil.which("mkfs.ext4") is None:
        reason = "mkfs.ext4 is missing (apt-get install e2fsprogs), or measure in /tmp: --filesystem tmp"
    if reason is not None:
        raise SystemExit(f"workspace_bench: {reason}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
