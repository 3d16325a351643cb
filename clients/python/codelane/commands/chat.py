"""`codelane chat`: a conversation at the terminal, one turn per line typed.

    codelane chat [--server HOST:PORT] [--profile NAME] [--workspace DIR] [--session ID | --continue]
                  [new session settings...] [--plain|--live]

Each line is sent as a message and its turn shown as `codelane run` shows it. Ctrl-C cancels the
running turn (its end is still shown) and the chat goes on; at the prompt it clears the line.
SIGTERM during a turn cancels it too, then ends the chat (exit 143). Ctrl-D (or /exit) leaves;
the session stays on the server, to continue with --session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from codelane.client import Client, CodelaneError, Session
from codelane.commands import args as types
from codelane.commands.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    add_connection_options,
    command_line,
    connect,
    error_line,
    parse,
    quiet_broken_pipe,
)
from codelane.commands.conversation import TurnConsole, add_session_options, check_session_options, open_session
from codelane.render import EventView

PROG = "codelane chat"
PROMPT = "you> "
LEAVE = ("/exit", "/quit")
# Errors after which no further turn can work: the chat ends.
_FATAL = ("UNAVAILABLE", "UNAUTHENTICATED", "NOT_FOUND")


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Talk with a session: each line you type is a turn. Ctrl-C cancels a turn, "
                           "Ctrl-D leaves.")
    add_connection_options(p)
    add_session_options(p)
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="one line per event (the default off a terminal)")
    view.add_argument("--live", action="store_true", help="the live view (the default on a terminal)")
    return p


def _read(prompt: str) -> str | None:
    """The next line typed; None at the end of input (Ctrl-D). Ctrl-C gives an empty line. The
    prompt goes to stdout when it is the terminal, else to stderr: stdout then holds only the
    turns (`| tee transcript`)."""
    out = sys.stdout if sys.stdout.isatty() else sys.stderr
    try:
        if out is sys.stdout:
            return input(prompt)  # readline's line editing redraws its own prompt
        out.write(prompt)
        out.flush()
        return input()
    except EOFError:
        if prompt:
            print(file=out)  # ends the prompt's line
        return None
    except KeyboardInterrupt:
        if prompt:
            print(file=out)
        return ""


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    check_session_options(parser, args)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (line editing and history for input())
    # One event loop for the whole chat, run during each call and turn: the client's channel
    # lives on it. Between turns the loop waits while the person types.
    with asyncio.Runner() as runner:
        client: Client | None = None
        try:
            client = runner.run(_connect(args))
            session: Session = runner.run(open_session(client, args))
            return _talk(runner, session, args)
        except CodelaneError as exc:
            print(error_line(PROG, exc, args.connection), file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            return quiet_broken_pipe()
        finally:
            if client is not None:
                with contextlib.suppress(KeyboardInterrupt):
                    runner.run(client.close())


async def _connect(args: argparse.Namespace) -> Client:
    return connect(args.connection)


def _talk(runner: asyncio.Runner, session: Session, args: argparse.Namespace) -> int:
    view = EventView.choose(plain=args.plain, live=args.live)
    console = TurnConsole(session, view, args.connection, PROG)
    info = session.info
    print(f"{PROG}: session {session.id} on {info.workspace} ({info.model or 'the default model'}); "
          "Ctrl-C cancels a turn, Ctrl-D leaves", file=sys.stderr)
    # input() writes its prompt to stdout: lines read from a pipe or a file get none, so that
    # stdout holds only the turns.
    prompt = PROMPT if sys.stdin.isatty() else ""
    while True:
        line = _read(prompt)
        if line is None or line.strip() in LEAVE:
            break
        if not line.strip():
            continue
        try:
            if runner.run(console.send(line)).terminated:
                return EXIT_TERMINATED  # SIGTERM: the turn is cancelled, and the chat ends
        except KeyboardInterrupt:  # Ctrl-C before the turn began: nothing was sent
            print()
        except CodelaneError as exc:
            print(error_line(PROG, exc, args.connection), file=sys.stderr)
            if exc.code in _FATAL:
                return EXIT_ERROR
    again = command_line("codelane chat", "--session", session.id, connection=args.connection)
    print(f"{PROG}: left session {session.id}; continue it with: {again}", file=sys.stderr)
    return 0
