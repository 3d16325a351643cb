"""`codelane delete SESSION...`: delete sessions, their histories and their event logs.

    codelane delete [--server HOST:PORT] [--profile NAME] SESSION [SESSION ...]

A running turn is cancelled first. Every session named is tried; the exit status is 1 if any
could not be deleted.
"""

from __future__ import annotations

import argparse
import sys

from codelane.client import Client, CodelaneError
from codelane.commands import args as types
from codelane.commands.common import EXIT_ERROR, add_connection_options, client_main, error_line

PROG = "codelane delete"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Delete sessions with their history (a running turn is cancelled first).")
    add_connection_options(p)
    p.add_argument("sessions", nargs="+", metavar="SESSION", help="the sessions' ids (see `codelane sessions`)")
    return p


async def delete(client: Client, args: argparse.Namespace) -> int:
    status = 0
    for session_id in args.sessions:
        try:
            await client.delete_session(session_id)
        except CodelaneError as exc:
            if exc.code in ("UNAVAILABLE", "UNAUTHENTICATED", "DEADLINE_EXCEEDED"):
                raise  # the others would fail the same way
            print(error_line(PROG, exc, args.connection), file=sys.stderr)
            status = EXIT_ERROR
            continue
        print(f"session {session_id} deleted")
    return status


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, delete)
