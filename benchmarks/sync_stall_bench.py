"""How long a synced worker's event loop stalls while it syncs a big tree (its heartbeats: every 2 s,
missed after 6 s).

    python -m benchmarks.sync_stall_bench [--files 200000] [--dir /tmp]

One process: a server snapshots a generated workspace of --files small files in two directories,
and a WorkspaceManager (the worker's) syncs a copy of it, while a ticker task measures the longest
gap between its 10 ms ticks. Prints the longest stall of three syncs: cold (every file written),
after every file's mtime changed (a times-only move: chmod/utimes, no content), and after a
one-file edit. The server shares the process and its loop: its content service's work is in the
figures too (a worker on another host does not carry it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc

from session_server.server import CodelaneServer, ServerConfig
from tool_worker.cas import CasClient
from tool_worker.merkle import SnapshotRef
from tool_worker.workspaces import WorkspaceManager


async def longest_stall(work) -> tuple[float, float]:
    """(seconds `work` took, the longest gap between two ticks of a 10 ms ticker meanwhile)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await work
    took = time.monotonic() - started
    done.set()
    await task
    return took, max(gaps, default=0.0)


def generate(ws: Path, files: int) -> None:
    for d in range(2):
        (ws / f"d{d}").mkdir(parents=True)
        for i in range(files // 2):
            (ws / f"d{d}" / f"file-{i:06d}.txt").write_bytes(b"%d %d\n" % (d, i))


async def run(files: int, base: Path) -> None:
    ws = base / "ws"
    generate(ws, files)
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=base / "data"))
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    manager = WorkspaceManager(roots=(str(base / "elsewhere"),), cache_dir=str(base / "cache"))
    manager.configure(CasClient(channel), server.snapshots.excludes)
    snapshots = server.snapshots.of(str(ws))

    async def sync(label: str) -> None:
        snapshots.changed()
        snap = await snapshots.current()
        ref = SnapshotRef(str(ws), snap.digest, snap.times_digest)

        async def place() -> None:
            (await manager.place(ref)).release()

        took, stall = await longest_stall(place())
        print(f"{label:<32} sync {took:6.2f} s   longest loop stall {stall * 1000:7.0f} ms", flush=True)

    try:
        await sync(f"cold, {files:,} files")
        now = time.time_ns()
        for d in range(2):
            for i in range(files // 2):
                os.utime(ws / f"d{d}" / f"file-{i:06d}.txt", ns=(now, now))
        await sync("every mtime changed")
        (ws / "d0" / "file-000000.txt").write_bytes(b"edited\n")
        await sync("one file edited")
    finally:
        manager.close()
        await channel.close()
        await server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--dir", default=None, help="where to generate the workspace and the cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as base:
        asyncio.run(run(args.files, Path(base)))


if __name__ == "__main__":
    main()
