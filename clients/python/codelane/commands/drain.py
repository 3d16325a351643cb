"""`codelane drain WORKER`: ask a worker to finish its calls, take no more, and disconnect.

    codelane drain [--server HOST:PORT] [--profile NAME] [--reason TEXT] WORKER

A local worker (one the server started, `local-N`) is replaced by a new process once it has left.
"""

from __future__ import annotations

import argparse

from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main

PROG = "codelane drain"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Drain a tool worker (see `codelane workers`). The server replaces a drained local "
                           "worker (local-N) with a new process.")
    add_connection_options(p)
    p.add_argument("--reason", default="", help="why, for the worker's log")
    p.add_argument("worker", help="the worker's id (see `codelane workers`)")
    return p


async def drain(client: Client, args: argparse.Namespace) -> int:
    await client.drain_worker(args.worker, args.reason)
    print(f"worker {args.worker} is draining: it finishes the calls it has, takes no new ones, then disconnects")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, drain)
