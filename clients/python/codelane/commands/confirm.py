"""`codelane confirm SESSION CALL --approve|--reject`: answer a call that waits for a confirmation,
from any terminal (`codelane run` prints the exact command when it cannot ask).

    codelane confirm [--server HOST:PORT] [--profile NAME] SESSION CALL (--approve | --reject) [--reason TEXT]

A rejected call's reason is shown to the model. Exits 1 (NOT_FOUND) when no such call waits: it
was answered already, timed out, or its turn ended.
"""

from __future__ import annotations

import argparse

from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main

PROG = "codelane confirm"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Approve or reject a tool call that waits for a confirmation.")
    add_connection_options(p)
    answer = p.add_mutually_exclusive_group(required=True)
    answer.add_argument("--approve", action="store_true", help="let the call run")
    answer.add_argument("--reject", action="store_true", help="refuse it: it does not run")
    p.add_argument("--reason", default="", help="why, shown to the model when the call is rejected")
    p.add_argument("session", help="the session's id")
    p.add_argument("call", help="the call's id (in the confirmation_required event)")
    return p


async def confirm(client: Client, args: argparse.Namespace) -> int:
    session = await client.get_session(args.session)
    await session.confirm(args.call, args.approve, args.reason)
    print(f"call {args.call} of session {session.id}: {'approved' if args.approve else 'rejected'}")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, confirm)
