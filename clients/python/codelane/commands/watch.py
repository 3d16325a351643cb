"""`codelane watch SESSION`: replay a session's events, then follow new ones as they happen.

    codelane watch [--server ADDR] [--token T] [--after N] [--no-follow] [--json] SESSION

The replay ends with a "caught up" marker; with --no-follow the command stops there, otherwise it
follows the session until Ctrl-C (which only stops watching: a running turn goes on).
"""

from __future__ import annotations

import argparse
import sys

from codelane.commands.common import add_server_options, add_token_option, connect, run_command
from codelane.render import PlainRenderer, event_json

PROG = "codelane watch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Replay and follow a session's events.")
    add_server_options(p)
    add_token_option(p)
    p.add_argument("--after", type=int, default=0, metavar="N", help="start after event sequence N (default 0: all)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="stop once caught up instead of following new events")
    p.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    p.add_argument("session", help="the session's id (see `codelane sessions`)")
    return p


async def watch(args: argparse.Namespace) -> int:
    renderer = PlainRenderer(sys.stdout)
    async with connect(args.server, args) as client:
        session = await client.get_session(args.session)
        async for event in session.watch(args.after, follow=args.follow):
            if args.json:
                print(event_json(event), flush=True)
            else:
                renderer.show(event)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.after < 0:
        print(f"{PROG}: --after must be 0 or more, got {args.after}", file=sys.stderr)
        return 2
    return run_command(PROG, args.server, lambda: watch(args))
