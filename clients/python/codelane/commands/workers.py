"""`codelane workers`: the tool workers connected to the server, and which workspaces each can serve.

    codelane workers [--server HOST:PORT] [--profile NAME] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from codelane.client import Client, WorkerInfo
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main, print_table

PROG = "codelane workers"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "List the connected tool workers.")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per worker, for scripts")
    return p


def workspaces_cell(worker: WorkerInfo) -> str:
    """Each workspace the worker holds or was asked about: how (shared: the server's own files;
    synced: a copy), at which snapshot, or why not."""
    if not worker.workspaces and not worker.omitted_workspaces:
        return "-"
    parts = []
    for path, held in sorted(worker.workspaces.items()):
        verdict = held.mode or ("visible" if held.visible else "not visible")
        if held.snapshot and held.mode != "unavailable":
            verdict += f" @{held.snapshot[:12]}"
        parts.append(f"{path}: {verdict}" + (f" ({held.reason})" if held.reason and not held.visible else ""))
    if worker.omitted_workspaces:
        parts.append(f"{worker.omitted_workspaces} more the server did not list (too long to send)")
    return "; ".join(parts)


async def list_workers(client: Client, args: argparse.Namespace) -> int:
    workers = await client.list_workers()
    if args.json:
        for worker in workers:
            print(json.dumps(dataclasses.asdict(worker), ensure_ascii=False))
        return 0
    rows = [
        (w.worker_id, w.hostname or "-", ",".join(f"{k}={v}" for k, v in sorted(w.labels.items())) or "-",
         ",".join(w.tools) or "-", str(w.slots), str(w.in_flight), "draining" if w.draining else "ready",
         workspaces_cell(w))
        for w in workers
    ]
    print_table(("ID", "HOST", "LABELS", "TOOLS", "SLOTS", "IN-FLIGHT", "STATE", "WORKSPACES"), rows,
                empty=f"no workers connected to {args.server}")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, list_workers)
