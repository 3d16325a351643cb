"""`codelane demo`: the whole system on one machine, on built-in defaults.

Starts a session server with local tool workers and the scripted demo model, copies a small
sample project to a temporary folder, runs one session on it and shows every event (live on a
terminal, one line each otherwise). The turn mixes parallel Query calls (fanned out to the
workers) with Execute calls run in model order, including a read right after an edit of the same
file.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from codelane import events as ev
from codelane.client import Client
from codelane.commands import args as types
from codelane.render import EventView
from session_server.embedded import embedded_server

PROMPT = "Fix the TODO in the greeter and note what you changed."


class _Help(types.HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's docstring as it is written, and the options' defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = types.Parser(prog="codelane demo", description=__doc__, formatter_class=_Help)
    parser.add_argument("--local-workers", type=types.non_negative_int, default=2, metavar="N",
                        help="local tool workers")
    parser.add_argument("--workers", dest="local_workers", type=types.non_negative_int, action=types.Renamed,
                        new="--local-workers")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="print events as JSON lines")
    view.add_argument("--plain", action="store_true", help="one line per event (the default off a terminal)")
    view.add_argument("--live", action="store_true", help="the live view (the default on a terminal)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    types.say_renamed(parser, args)
    view = EventView.choose(json=args.json, plain=args.plain, live=args.live)
    try:
        return asyncio.run(_demo(args.local_workers, view))
    except KeyboardInterrupt:
        return 130


async def _demo(workers: int, view: EventView) -> int:
    package = resources.files(__package__)
    with tempfile.TemporaryDirectory(prefix="codelane-demo-") as tmp:
        workspace = Path(tmp) / "greeter"
        with resources.as_file(package / "workspace") as sample:
            shutil.copytree(sample, workspace)
        with resources.as_file(package / "script.yaml") as script_file:
            script = Path(tmp) / "script.yaml"
            shutil.copyfile(script_file, script)
        started = time.perf_counter()
        async with embedded_server(model=f"scripted:{script}", local_workers=workers) as address:
            view.note(f"codelane demo: server on {address} with {workers} local workers; workspace {workspace}")
            async with Client(address) as client:
                session = await client.create_session(workspace)
                finished: ev.TurnFinished | None = None
                with view.running():
                    async for event in session.send(PROMPT):
                        view.show(event)
                        if isinstance(event, ev.TurnFinished):
                            finished = event
        elapsed = time.perf_counter() - started
        print(f"codelane demo: done in {elapsed:.1f}s; greet.py now reads:")
        print((workspace / "app" / "greet.py").read_text())
    return 0 if finished is not None and finished.stop_reason == "end_turn" else 1
