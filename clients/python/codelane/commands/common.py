"""What the client subcommands share: the server options, one-line errors, exit codes, tables."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from codelane.client import DEFAULT_ADDRESS, Client, CodelaneError
from codelane.transport import address_option

UNARY_TIMEOUT = 10.0  # deadline of every unary call the CLI makes; streams have none
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def add_server_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--server and --token, defaulting to $CODELANE_SERVER and $CODELANE_TOKEN."""
    parser.add_argument("--server", default=os.environ.get("CODELANE_SERVER") or DEFAULT_ADDRESS, metavar="ADDR",
                        type=address_option, help=f"server address, HOST:PORT (default $CODELANE_SERVER or "
                        f"{DEFAULT_ADDRESS})")


def add_token_option(parser: argparse.ArgumentParser) -> None:
    """--token (default $CODELANE_TOKEN) and the TLS options."""
    parser.add_argument("--token", default=os.environ.get("CODELANE_TOKEN") or None,
                        help="bearer token (default $CODELANE_TOKEN)")
    parser.add_argument("--tls-ca", help="CA certificate of the server (turns TLS on)")
    parser.add_argument("--tls-cert", help="client certificate, for mTLS")
    parser.add_argument("--tls-key", help="client private key, for mTLS")


def connect(address: str, args: argparse.Namespace) -> Client:
    """An async client (token and TLS from the options) whose unary calls give up after UNARY_TIMEOUT."""
    return Client(address, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  timeout=UNARY_TIMEOUT)


def error_line(prog: str, exc: CodelaneError, address: str) -> str:
    """One line saying what went wrong and, where there is one, what to do."""
    if exc.code == "UNAVAILABLE":
        text = f"cannot reach the server at {address} (UNAVAILABLE): is `codelane server` running?"
    elif exc.code == "DEADLINE_EXCEEDED":
        text = f"the server at {address} did not answer within {UNARY_TIMEOUT:g}s (DEADLINE_EXCEEDED)"
    elif exc.code == "UNAUTHENTICATED":
        text = f"the server at {address} refused the token ({exc}): pass --token or set $CODELANE_TOKEN"
    else:
        text = str(exc)
    return f"{prog}: " + " ".join(text.split())


def run_command(prog: str, address: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Runs a subcommand's coroutine: a CodelaneError becomes one line on stderr and exit 1,
    Ctrl-C exit 130."""
    try:
        return asyncio.run(main())
    except CodelaneError as exc:
        print(error_line(prog, exc, address), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    """A table on stdout: boxed on a terminal; plain aligned columns, never cut, in a pipe."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print(empty)
        return
    interactive = sys.stdout.isatty()
    # Off a terminal, a very wide console keeps rows whole, one line per row, for grep and awk.
    console = Console() if interactive else Console(width=100_000, no_color=True, highlight=False)
    table = Table(box=box.SIMPLE_HEAD if interactive else None, pad_edge=False, show_edge=False,
                  header_style="bold" if interactive else "")
    for header in headers:
        table.add_column(header, overflow="fold" if interactive else "ignore", no_wrap=not interactive)
    for row in rows:
        table.add_row(*row)
    if interactive:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()

