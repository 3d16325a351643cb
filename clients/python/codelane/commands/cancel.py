"""`codelane cancel SESSION`: cancel a session's running turn, from any terminal.

    codelane cancel [--server HOST:PORT] [--profile NAME] [--reason TEXT] SESSION

Every call of the turn still gets its result (cancelled), so the history stays valid. Exits 0
whether a turn was running or not, and says which.
"""

from __future__ import annotations

import argparse

from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main

PROG = "codelane cancel"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Cancel the turn a session is running.")
    add_connection_options(p)
    p.add_argument("--reason", default="cancelled with `codelane cancel`", help="why, recorded with the turn")
    p.add_argument("session", help="the session's id (see `codelane sessions`)")
    return p


async def cancel(client: Client, args: argparse.Namespace) -> int:
    session = await client.get_session(args.session)
    if await session.cancel(args.reason):
        print(f"session {session.id}: the running turn was cancelled")
    else:
        print(f"session {session.id}: no turn was running")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, cancel)
