"""`codelane sessions`: the server's sessions, newest first.

    codelane sessions [--server ADDR] [--token T] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from codelane.commands.common import add_server_options, add_token_option, connect, print_table, run_command

PROG = "codelane sessions"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="List the server's sessions, newest first.")
    add_server_options(p)
    add_token_option(p)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="show at most N sessions (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per session, for scripts")
    return p


async def list_sessions(args: argparse.Namespace) -> int:
    async with connect(args.server, args) as client:
        sessions = []
        async for info in client.list_sessions():
            sessions.append(info)
            if args.limit and len(sessions) >= args.limit:
                break
    if args.json:
        for info in sessions:
            print(json.dumps(dataclasses.asdict(info), ensure_ascii=False))
        return 0
    rows = [
        (s.session_id, s.workspace, s.model or "-", s.state, str(s.last_sequence), str(s.message_count),
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)))
        for s in sessions
    ]
    print_table(("ID", "WORKSPACE", "MODEL", "STATE", "EVENTS", "MESSAGES", "CREATED"), rows,
                empty=f"no sessions on {args.server}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.server, lambda: list_sessions(args))
