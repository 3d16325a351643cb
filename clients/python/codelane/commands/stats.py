"""`codelane stats`: per lane, the calls pending, running, completed and failed, and their latency.

    codelane stats [--server HOST:PORT] [--profile NAME] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main, print_table

PROG = "codelane stats"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Show the lanes' queue statistics.")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per lane (latencies in seconds)")
    return p


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


async def show_stats(client: Client, args: argparse.Namespace) -> int:
    lanes = await client.queue_stats()
    if args.json:
        for lane in lanes:
            print(json.dumps(dataclasses.asdict(lane)))
        return 0
    rows = [
        (s.lane, str(s.pending), str(s.active), str(s.completed), str(s.failed), _ms(s.p50), _ms(s.p90), _ms(s.p99))
        for s in lanes
    ]
    print_table(("LANE", "PENDING", "ACTIVE", "COMPLETED", "FAILED", "P50", "P90", "P99"), rows,
                empty="no lanes reported")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, show_stats)
