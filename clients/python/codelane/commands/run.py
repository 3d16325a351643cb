"""`codelane run`: create a session, send one prompt, show the turn as it happens.

    codelane run [--server ADDR] [--token T] --workspace DIR [--model M] [--json|--plain|--live]
                 [--sandbox MODE] [--network on|off] [--env NAME=VALUE ...] "PROMPT"
    codelane run --embedded --workspace DIR --model scripted:FILE "PROMPT"

On a terminal the turn is shown live (streaming text, a table of tool calls, progress, summary);
`--plain` prints one line per event instead, `--json` one JSON object per event. When a tool call
needs confirmation and stdin is a terminal, it asks y/n. Ctrl-C cancels the turn and exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

from codelane import events as ev
from codelane.client import CodelaneError, Session
from codelane.commands.common import add_server_options, add_token_option, connect, run_command
from codelane.render import EventView

PROG = "codelane run"
CANCEL_TIMEOUT = 5.0  # bound on cancelling the turn after Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run one prompt in a new session.")
    where = p.add_mutually_exclusive_group()
    add_server_options(where)
    where.add_argument("--embedded", action="store_true",
                       help="start a server with local workers in this process, just for this run")
    add_token_option(p)
    p.add_argument("--workspace", type=Path, default=Path.cwd(), help="workspace directory (default: here)")
    p.add_argument("--model", default="", help="provider:name (default: the server's)")
    p.add_argument("--workers", type=int, default=2, help="local workers of --embedded (default 2)")
    rules = p.add_argument_group("permissions (rules like `bash`, `bash(git *)`, `write(src/**)`; repeatable)")
    rules.add_argument("--ask", action="append", default=[], metavar="RULE",
                       help="calls that wait for a confirmation (asked here when stdin is a terminal)")
    rules.add_argument("--deny", action="append", default=[], metavar="RULE", help="calls that are refused")
    rules.add_argument("--allow", action="append", default=[], metavar="RULE", help="calls that just run")
    box = p.add_argument_group("sandbox of the session's bash and execute calls (default: the server's)")
    box.add_argument("--sandbox", choices=["workspace-write", "read-only", "off"],
                     help="what commands may change; off needs a server started with --allow-unsandboxed")
    box.add_argument("--network", choices=["off", "on"],
                     help="network for confined commands; on needs a server started with --sandbox-allow-network")
    box.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", type=_variable,
                     help="an environment variable of the session's commands (repeatable)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    view.add_argument("--plain", action="store_true", help="one line per event (the default off a terminal)")
    view.add_argument("--live", action="store_true", help="the live view (the default on a terminal)")
    p.add_argument("prompt")
    return p


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


async def _read_line(within: float | None) -> str | None:
    """A line from stdin without blocking the loop (so Ctrl-C still works); None on timeout."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(line, within)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)


async def _confirm(session: Session, event: ev.ConfirmationRequired, view: EventView) -> None:
    """Asks the person at the terminal whether the call may run, and tells the server."""
    confirm = getattr(session, "confirm", None)
    if event.call is None or confirm is None or not sys.stdin.isatty():
        return  # someone else (another client, the deadline) decides
    call = event.call
    timeout = event.deadline - time.time() if event.deadline else None
    if timeout is not None and timeout <= 0:
        return
    within = f" (answer within {timeout:.0f}s)" if timeout is not None else ""
    with view.paused():
        sys.stderr.write(f"codelane run: allow {call.tool_name} {call.arguments_json}?{within} [y/N] ")
        sys.stderr.flush()
        answer = await _read_line(timeout)
        if answer is None:
            sys.stderr.write("\ncodelane run: no answer before the deadline; the server decides\n")
            return
    approve = answer.strip().lower() in ("y", "yes")
    try:
        await confirm(call.call_id, approve)
    except CodelaneError as exc:
        sys.stderr.write(f"{PROG}: could not confirm {call.call_id}: {' '.join(str(exc).split())}\n")


async def _cancel_turn(session: Session) -> None:
    with contextlib.suppress(CodelaneError, TimeoutError):
        await asyncio.wait_for(session.cancel("interrupted from codelane run"), CANCEL_TIMEOUT)
        sys.stderr.write(f"{PROG}: interrupted; the turn was cancelled\n")


async def run_prompt(address: str, args: argparse.Namespace) -> int:
    view = EventView.choose(json=args.json, plain=args.plain, live=args.live)
    async with connect(address, args) as client:
        rules = {key: getattr(args, key) for key in ("allow", "deny", "ask") if getattr(args, key)}
        options: dict = {"permissions": rules} if rules else {}
        sandbox = {key: getattr(args, attr) for key, attr in (("mode", "sandbox"), ("network", "network"))
                   if getattr(args, attr)}
        if sandbox:
            options["sandbox"] = sandbox
        if args.env:
            options["env"] = dict(args.env)
        session = await client.create_session(args.workspace.resolve(), model=args.model, **options)
        view.note(f"session {session.id} on {session.info.workspace} ({session.info.model})")
        stop = ""
        try:
            with view.running():
                async for event in session.send(args.prompt):
                    view.show(event)
                    if isinstance(event, ev.ConfirmationRequired):
                        await _confirm(session, event, view)
                    elif isinstance(event, ev.TurnFinished):
                        stop = event.stop_reason
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
            await _cancel_turn(session)
            raise
        return 0 if stop in ("end_turn", "max_turns") else 1


async def _main(args: argparse.Namespace) -> int:
    if not args.embedded:
        return await run_prompt(args.server, args)
    from session_server.embedded import embedded_server

    # The person running an embedded server is its operator: what they ask for is allowed.
    async with embedded_server(model=args.model, local_workers=args.workers,
                               allow_unsandboxed=args.sandbox == "off", allow_network=args.network == "on") as address:
        return await run_prompt(address, args)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    address = "an embedded server" if args.embedded else args.server
    return run_command(PROG, address, lambda: _main(args))
