"""`codelane drain WORKER`: ask a worker to finish its calls, take no more, and disconnect.

    codelane drain [--server ADDR] [--token T] [--reason TEXT] WORKER
"""

from __future__ import annotations

import argparse

from codelane.commands.common import add_server_options, add_token_option, connect, run_command

PROG = "codelane drain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Drain a tool worker (see `codelane workers`).")
    add_server_options(p)
    add_token_option(p)
    p.add_argument("--reason", default="", help="why, for the worker's log")
    p.add_argument("worker", help="the worker's id")
    return p


async def drain(args: argparse.Namespace) -> int:
    async with connect(args.server, args) as client:
        await client.drain_worker(args.worker, args.reason)
    print(f"worker {args.worker} is draining: it finishes the calls it has, takes no new ones, then disconnects")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.server, lambda: drain(args))
