"""`codelane watch SESSION`: replay a session's events, then follow new ones as they happen.

    codelane watch [--server HOST:PORT] [--profile NAME] [--after N] [--no-follow] [--json] SESSION

The replay ends with a "caught up" marker; with --no-follow the command stops there, otherwise it
follows the session until Ctrl-C (which only stops watching: a running turn goes on). A stream
that breaks is resumed after the last event shown; one the SDK cannot resume within its budget
ends with the `codelane watch --after N` that goes on from there.
"""

from __future__ import annotations

import argparse
import sys

from codelane.client import Client, CodelaneError
from codelane.commands import args as types
from codelane.commands.common import StreamLost, add_connection_options, client_main
from codelane.events import CaughtUp
from codelane.render import PlainRenderer, event_json

PROG = "codelane watch"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Replay and follow a session's events.")
    add_connection_options(p)
    p.add_argument("--after", type=types.non_negative_int, default=0, metavar="N",
                   help="start after event sequence N (default: 0, all)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="stop once caught up instead of following new events")
    p.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    p.add_argument("session", help="the session's id (see `codelane sessions`)")
    return p


async def watch(client: Client, args: argparse.Namespace) -> int:
    renderer = PlainRenderer(sys.stdout)
    session = await client.get_session(args.session)
    last, delivered = args.after, False  # the last event shown; whether the stream said anything
    try:
        async for event in session.watch(args.after, follow=args.follow):
            delivered = True
            if not isinstance(event, CaughtUp):
                last = event.sequence
            if args.json:
                print(event_json(event), flush=True)
            else:
                renderer.show(event)
    except CodelaneError as exc:
        # Lost mid-way (past the SDK's resumes): say where to watch on from.
        lost = StreamLost.of(exc, session.id, last, delivered=delivered, turn=False)
        if lost is None:
            raise
        raise lost from exc
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, watch)
