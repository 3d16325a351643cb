"""`codelane run`: create a session, send one prompt, print the turn's events.

    codelane run --server ADDR --workspace DIR [--model M] [--json] "PROMPT"
    codelane run --embedded --workspace DIR --model scripted:FILE "PROMPT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from codelane import events as ev
from codelane.client import DEFAULT_ADDRESS, Client, CodelaneError
from codelane.render import PlainRenderer, event_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codelane run", description="Run one prompt in a new session.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=os.environ.get("CODELANE_SERVER", DEFAULT_ADDRESS),
                       help=f"server address (default $CODELANE_SERVER or {DEFAULT_ADDRESS})")
    where.add_argument("--embedded", action="store_true",
                       help="start a server with local workers in this process, just for this run")
    p.add_argument("--workspace", type=Path, default=Path.cwd(), help="workspace directory (default: here)")
    p.add_argument("--model", default="", help="provider:name (default: the server's)")
    p.add_argument("--workers", type=int, default=2, help="local workers of --embedded (default 2)")
    p.add_argument("--token", default=os.environ.get("CODELANE_TOKEN"), help="bearer token")
    p.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    p.add_argument("prompt")
    return p


async def run_prompt(address: str, args: argparse.Namespace) -> int:
    renderer = PlainRenderer(sys.stdout)
    async with Client(address, token=args.token) as client:
        session = await client.create_session(args.workspace.resolve(), model=args.model)
        if not args.json:
            print(f"session {session.id} on {session.info.workspace} ({session.info.model})", flush=True)
        stop = ""
        async for event in session.send(args.prompt):
            if args.json:
                print(event_json(event), flush=True)
            else:
                renderer.show(event)
            if isinstance(event, ev.TurnFinished):
                stop = event.stop_reason
        return 0 if stop in ("end_turn", "max_turns") else 1


async def _main(args: argparse.Namespace) -> int:
    if not args.embedded:
        return await run_prompt(args.server, args)
    from session_server.embedded import embedded_server

    async with embedded_server(model=args.model, local_workers=args.workers) as address:
        return await run_prompt(address, args)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except CodelaneError as exc:
        print(f"codelane run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.write("codelane run: interrupted (the turn goes on on the server)\n")
        return 130
