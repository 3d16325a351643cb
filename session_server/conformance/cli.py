"""`codelane conformance`: check a tool worker or a client library against the protocol.

    codelane conformance worker [--within SECONDS] [--tool NAME --arguments JSON] -- COMMAND...
    codelane conformance client [--within SECONDS] -- COMMAND...

COMMAND is run with `{hub}` / `{server}` replaced by the kit's address (also in $CODELANE_HUB /
$CODELANE_SERVER) and `{token}` by the worker token (also in $CODELANE_WORKER_TOKEN). Each check
prints PASS, FAIL or SKIP with a one-line reason; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from codelane.commands import args as types
from session_server.conformance.checks import DEFAULT_WITHIN, SCENARIO_WITHINS, START_WITHIN

PROG = "codelane conformance"


def build_parser() -> argparse.ArgumentParser:
    parser = types.parser(PROG, "Check that a tool worker or a client follows the codelane protocol.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{worker,client}")
    worker = kinds.add_parser(
        "worker", help="run a worker command against a test hub",
        description="Start a test hub on 127.0.0.1, launch COMMAND against it ({hub}, {token}; $CODELANE_HUB, "
                    "$CODELANE_WORKER_TOKEN) and check Hello/Welcome, heartbeats, content sync, assignments (valid, "
                    "invalid, beyond its slots), cancel, a wrong token, a hub restart and drain.",
    )
    worker.add_argument("--tool", metavar="NAME", help="the tool to call (default: the first Query tool by name)")
    worker.add_argument("--arguments", metavar="JSON", help="its arguments (default: made from its schema)")
    client = kinds.add_parser(
        "client", help="run a client command against a scripted server",
        description="Start a scripted session server on 127.0.0.1 and run COMMAND ({server}; $CODELANE_SERVER), "
                    "which plays the scenario of docs/protocol.md (\"Conformance kits\", `codelane conformance "
                    "client`): the kit checks what it did and what it printed.",
    )
    worker.add_argument("--within", type=types.positive_float, default=DEFAULT_WITHIN, metavar="SECONDS",
                        help="how long to wait for each thing the worker must do once connected: answer a call, "
                             "free a cancelled call's slot, close its stream on Drain, exit (default "
                             f"{DEFAULT_WITHIN:g}). Its first Hello, the exit of the one started with a wrong "
                             f"token and its reconnection after the hub's restart get at least {START_WITHIN:g}s "
                             "however short SECONDS is: starting a process and the worker's backoff take time the "
                             "checks do not judge")
    client.add_argument("--within", type=types.positive_float, default=DEFAULT_WITHIN, metavar="SECONDS",
                        help=f"the command must play the whole scenario within {SCENARIO_WITHINS} x SECONDS "
                             f"(default {DEFAULT_WITHIN:g}), or it is killed")
    for sub in (worker, client):
        sub.add_argument("--logs", type=Path, metavar="DIR",
                         help="where to keep the command's output (default: a new temporary directory)")
        sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                         help="the command to check, after --")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to check after --, e.g. -- codelane worker --connect {hub}")
    if args.kind == "worker" and args.arguments is not None:
        try:
            if not isinstance(json.loads(args.arguments), dict):
                raise ValueError
        except ValueError:
            parser.error("--arguments must be a JSON object")
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="codelane-conformance-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def report(outcome) -> None:
        print(f"{outcome.status} {outcome.name}: {outcome.reason}", flush=True)

    if args.kind == "worker":
        from session_server.conformance.worker import run_checks

        outcomes = asyncio.run(run_checks(command, within=args.within, tool=args.tool,
                                          arguments_json=args.arguments, log_dir=log_dir, report=report))
    else:
        from session_server.conformance.client import run_checks

        outcomes = asyncio.run(run_checks(command, within=args.within, log_dir=log_dir, report=report))
    failed = [o.name for o in outcomes if o.status == "FAIL"]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} checks failed ({', '.join(failed)}); the command's output is in "
              f"{log_dir}", file=sys.stderr)
        return 1
    print(f"all {len(outcomes)} checks passed")
    return 0
