"""`codelane sessions`: the server's sessions, newest first.

    codelane sessions [--server HOST:PORT] [--profile NAME] [--limit N] [--workspace DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from codelane.client import Client
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main, print_table, workspace_path

PROG = "codelane sessions"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "List the server's sessions, newest first.")
    add_connection_options(p)
    p.add_argument("--limit", type=types.non_negative_int, default=0, metavar="N",
                   help="show at most N sessions (default: 0, all)")
    p.add_argument("--workspace", type=Path, metavar="DIR",
                   help="only the sessions of this workspace (a path on the server; relative: to the current "
                        "directory, as run and chat take it)")
    p.add_argument("--json", action="store_true", help="one JSON object per session, for scripts")
    return p


async def list_sessions(client: Client, args: argparse.Namespace) -> int:
    workspace = None if args.workspace is None else str(workspace_path(args.workspace))
    sessions = []
    async for info in client.list_sessions():
        if workspace is not None and info.workspace != workspace:
            continue
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
    return client_main(build_parser(), argv, list_sessions)
