"""`codelane health`: whether the server is up and serving, by the standard gRPC health check.

    codelane health [--server HOST:PORT] [--profile NAME] [--json]

Prints the status of the server and of each of its services, and the connected workers; exits 0
when everything is SERVING, 1 otherwise (or when the server cannot be reached). Needs no token for
the health check itself; the worker count needs one if the server asks for one.
"""

from __future__ import annotations

import argparse
import json

from codelane.client import Client, CodelaneError
from codelane.commands import args as types
from codelane.commands.common import EXIT_ERROR, add_connection_options, client_main

PROG = "codelane health"
SERVICES = ("codelane.v1.SessionService", "codelane.v1.WorkerHubService", "codelane.v1.AdminService")


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Check that the server is up and serving.")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return p


async def health(client: Client, args: argparse.Namespace) -> int:
    statuses = {"server": await client.health()}
    for service in SERVICES:
        statuses[service] = await client.health(service)
    try:
        workers: int | None = len(await client.list_workers())
    except CodelaneError as exc:
        if exc.code != "UNAUTHENTICATED":
            raise
        workers = None  # the health check is open, the admin service is not
    healthy = all(status == "SERVING" for status in statuses.values())
    if args.json:
        print(json.dumps({"server": args.server, "healthy": healthy, "statuses": statuses, "workers": workers}))
    else:
        print(f"{args.server}: {statuses['server']}")
        for service in SERVICES:
            print(f"  {service}: {statuses[service]}")
        print(f"  workers: {workers if workers is not None else 'unknown (the server wants a token)'}")
    return 0 if healthy else EXIT_ERROR


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, health)
