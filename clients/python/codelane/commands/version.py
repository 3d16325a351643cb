"""`codelane version`: this client's version and the server's.

    codelane version [--server HOST:PORT] [--profile NAME] [--json]

The client's version is printed first, so it shows even when the server cannot be reached (the
command then exits 1 with a line saying why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from codelane import __version__
from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main

PROG = "codelane version"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Show the versions of this client and of the server.")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return p


async def version(client: Client, args: argparse.Namespace) -> int:
    if not args.json:
        print(f"client: codelane {__version__}", flush=True)
    info = await client.server_info()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.started))
    if args.json:
        print(json.dumps({"client": __version__, "server": info.version, "server_address": args.server,
                          "server_started": info.started}))
    else:
        print(f"server: codelane {info.version} at {args.server}, up since {started}")
        if info.version != __version__:
            print(f"{PROG}: the client ({__version__}) and the server ({info.version}) differ", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, version)
