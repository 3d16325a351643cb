"""`codelane run`: send one prompt, in a new session or one to continue, and show the turn as it
happens.

    codelane run [--server HOST:PORT] [--profile NAME] [--workspace DIR] [--session ID | --continue]
                 [new session settings...] [--json|--plain|--live] "PROMPT"
    codelane run --embedded --workspace DIR --model scripted:FILE "PROMPT"

On a terminal the turn is shown live (streaming text, a table of tool calls, progress, summary);
`--plain` prints one line per event instead, `--json` one JSON object per event. A call that
needs a confirmation is asked about when stdin is a terminal; otherwise the `codelane confirm`
command that answers it is printed. Ctrl-C cancels the turn, shows its end and exits 130;
SIGTERM does the same and exits 143.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from codelane.client import CodelaneError
from codelane.commands import args as types
from codelane.commands.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    add_connection_options,
    connect,
    error_line,
    parse,
    quiet_broken_pipe,
)
from codelane.commands.config import Connection
from codelane.commands.conversation import (
    TurnConsole,
    add_session_options,
    check_session_options,
    open_session,
)
from codelane.render import EventView
from codelane.terminal import escape_controls

PROG = "codelane run"


def add_view_options(parser: argparse.ArgumentParser) -> None:
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    view.add_argument("--plain", action="store_true", help="one line per event (the default off a terminal)")
    view.add_argument("--live", action="store_true", help="the live view (the default on a terminal)")


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Send one prompt and show the turn as it happens.")
    where = p.add_mutually_exclusive_group()
    add_connection_options(p, server_group=where)
    where.add_argument("--embedded", action="store_true",
                       help="start a server with local workers in this process, just for this run")
    p.add_argument("--local-workers", type=types.non_negative_int, default=2, metavar="N",
                   help="local workers of --embedded")
    p.add_argument("--workers", dest="local_workers", type=types.non_negative_int, action=types.Renamed,
                   new="--local-workers")
    add_session_options(p)
    add_view_options(p)
    p.add_argument("prompt", help="what to ask, in quotes")
    return p


async def run_prompt(connection: Connection, args: argparse.Namespace) -> int:
    view = EventView.choose(json=args.json, plain=args.plain, live=args.live)
    async with connect(connection) as client:
        session = await open_session(client, args)
        view.note(f"session {session.id} on {session.info.workspace} ({session.info.model})")
        outcome = await TurnConsole(session, view, connection, PROG).send(args.prompt)
    if outcome.interrupted:
        return EXIT_TERMINATED if outcome.terminated else EXIT_INTERRUPTED
    if outcome.stop_reason in ("end_turn", "max_turns"):
        return 0
    # A script sees the exit status, and now why, where it reads errors (stdout may be JSON).
    why = f" ({escape_controls(outcome.error, keep_line_breaks=False)})" if outcome.error else ""
    print(f"{PROG}: the turn ended with {outcome.stop_reason or 'no end seen'}{why}", file=sys.stderr)
    return EXIT_ERROR


async def _main(args: argparse.Namespace) -> int:
    if not args.embedded:
        return await run_prompt(args.connection, args)
    from session_server.embedded import embedded_server
    from session_server.server import ServerConfigError

    try:
        # The person running an embedded server is its operator: what they ask for is allowed.
        async with embedded_server(model=args.model, local_workers=args.local_workers,
                                   allow_unsandboxed=args.sandbox == "off",
                                   allow_network=args.network == "on") as address:
            return await run_prompt(Connection(server=address), args)
    except ServerConfigError as exc:
        print(f"{PROG}: the embedded server cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    check_session_options(parser, args)
    connection = Connection(server="an embedded server") if args.embedded else args.connection
    try:
        return asyncio.run(_main(args))
    except CodelaneError as exc:
        print(error_line(PROG, exc, connection), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before or after the turn (during it, Ctrl-C cancels the turn)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return quiet_broken_pipe()
