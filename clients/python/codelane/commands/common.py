"""What the client subcommands share: the connection options, one-line errors, exit codes, tables."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from codelane.client import DEFAULT_ADDRESS, Client, CodelaneError, _resumable
from codelane.commands import args as types
from codelane.commands.config import ENV_VARS, ConfigError, Connection, resolve
from codelane.terminal import escape_controls

UNARY_TIMEOUT = 10.0  # deadline of every unary call the CLI makes; streams have none
EXIT_ERROR = 1
EXIT_USAGE = 2  # as argparse exits for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


def add_connection_options(parser: argparse.ArgumentParser, server_group: Any = None) -> None:
    """--server, --profile, --token and the TLS files. Each defaults to its environment variable,
    then to the profile in use of the config file (see codelane.commands.config). `server_group`:
    where --server goes (e.g. a group that excludes --embedded)."""
    where = server_group if server_group is not None else parser
    where.add_argument("--server", type=types.address, metavar="HOST:PORT",
                       help=f"the server (default: ${ENV_VARS['server']}, the profile's, or {DEFAULT_ADDRESS})")
    group = parser.add_argument_group("connection (each defaults to its $CODELANE_* variable, then the profile)")
    group.add_argument("--profile", metavar="NAME",
                       help="a profile of ~/.config/codelane/config.toml (default: $CODELANE_PROFILE, or the "
                            "file's `profile`)")
    group.add_argument("--token", help="bearer token ($CODELANE_TOKEN)")
    group.add_argument("--tls-ca", type=types.readable_file, metavar="FILE",
                       help="CA certificate of the server; turns TLS on ($CODELANE_TLS_CA)")
    group.add_argument("--tls-cert", type=types.readable_file, metavar="FILE",
                       help="client certificate, for mTLS ($CODELANE_TLS_CERT)")
    group.add_argument("--tls-key", type=types.readable_file, metavar="FILE",
                       help="client private key, for mTLS ($CODELANE_TLS_KEY)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses a client command's arguments and resolves its connection settings into
    `args.connection` (and `args.server`); a setting that cannot be used is a usage error."""
    args = parser.parse_args(argv)
    types.say_renamed(parser, args)
    flags = {setting: getattr(args, setting, None) for setting in ENV_VARS}
    try:
        args.connection = resolve(flags, getattr(args, "profile", None))
        if args.connection.token:
            types.check_token(args.connection.token)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: {exc}\n")
    except ValueError as exc:  # from $CODELANE_TOKEN or a profile as much as from --token
        parser.exit(EXIT_USAGE, f"{parser.prog}: {exc}: check --token, ${ENV_VARS['token']} or the profile's\n")
    args.server = args.connection.server
    return args


def connect(connection: Connection) -> Client:
    """An async client whose unary calls give up after UNARY_TIMEOUT."""
    return Client(connection.server, token=connection.token, tls_ca=connection.tls_ca, tls_cert=connection.tls_cert,
                  tls_key=connection.tls_key, timeout=UNARY_TIMEOUT)


def command_line(prog: str, *words: str, connection: Connection | None = None) -> str:
    """A command another terminal can paste: `prog`, the options that reach the same server as
    `connection` (never the token: that terminal needs its own), then `words`."""
    parts = [prog]
    if connection is not None:
        def from_profile(setting: str) -> bool:
            return connection.sources.get(setting, "").startswith("profile")

        if connection.profile is not None:  # "" too: no profile, where the file may name a default
            parts += ["--profile", connection.profile]
        if connection.server != DEFAULT_ADDRESS and not from_profile("server"):
            parts += ["--server", connection.server]
        for setting in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(connection, setting)
            if value and not from_profile(setting):
                parts += ["--" + setting.replace("_", "-"), value]
    return " ".join([*parts[:1], *(shlex.quote(part) for part in [*parts[1:], *words])])


class StreamLost(CodelaneError):
    """A session's event stream (of `run`, `chat` or `watch`) that broke after it had delivered,
    and that the SDK could not resume within its budget. The connection worked, so what gRPC
    says of the break (a socket closed, say) is no hint about TLS or the address: the error line
    says where to pick the session up instead. `turn`: whether a turn was being shown."""

    def __init__(self, cause: CodelaneError, session_id: str, after: int, *, turn: bool) -> None:
        super().__init__(cause.code, cause.message, cause.reason, cause.metadata)
        self.session_id = session_id
        self.after = after
        self.turn = turn

    @classmethod
    def of(cls, exc: CodelaneError, session_id: str, after: int, *, delivered: bool, turn: bool) -> StreamLost | None:
        """`exc` as a StreamLost when it is a break of a stream that had `delivered` something
        (the SDK resumes those, and raises only once its budget is spent), else None."""
        return cls(exc, session_id, after, turn=turn) if delivered and _resumable(exc) else None


def stream_lost_line(exc: StreamLost, connection: Connection) -> str:
    """What to say of a stream lost mid-way: after which event, and the command that goes on from
    there."""
    watch = command_line("codelane watch", exc.session_id, "--after", str(exc.after), connection=connection)
    # The server's own words (a SHUTTING_DOWN's) name RPCs: the reason says enough.
    why = f"{exc.code} {exc.reason}" if exc.reason else f"{exc.code}: {exc.message}"
    what = "the turn goes on" if exc.turn else "the session goes on"
    return (f"lost the connection to {connection.server} after sequence {exc.after} ({why}); {what}: "
            f"`{watch}`")


def unreachable(address: str, message: str, tls: bool) -> str:
    """The real cause of an UNAVAILABLE, from gRPC's own words, and what to do about it."""
    text = message.lower()
    if "connection refused" in text:
        return f"nothing listens at {address} (connection refused, UNAVAILABLE): is `codelane server` running there?"
    if "resolv" in text or "domain name not found" in text or "dns" in text:
        host = address.rsplit(":", 1)[0]
        return f"cannot resolve the host {host!r} of {address} (UNAVAILABLE): check the name"
    if "http/2" in text or "http1" in text or "http/1" in text:
        return f"{address} does not speak gRPC (it answered as an HTTP/1 server, UNAVAILABLE): check the port"
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (f"the certificate of {address} is not signed by the CA of --tls-ca (TLS handshake failed, "
                "UNAVAILABLE)")
    if "wrong_version_number" in text or ("handshake" in text and tls):
        return (f"the TLS handshake with {address} failed (UNAVAILABLE): does the server use TLS? Drop --tls-ca "
                "if it does not")
    if "socket closed" in text and not tls:
        return f"{address} closed the connection (UNAVAILABLE): if the server uses TLS, pass --tls-ca"
    detail = " ".join(message.split())
    return f"cannot reach the server at {address} (UNAVAILABLE): {detail}"


def error_line(prog: str, exc: CodelaneError, connection: Connection) -> str:
    """One line saying what went wrong and, where there is one, what to do."""
    address = connection.server
    if isinstance(exc, StreamLost):
        text = stream_lost_line(exc, connection)
    elif exc.code == "UNAVAILABLE":
        text = unreachable(address, exc.message, connection.tls_ca is not None)
    elif exc.code == "DEADLINE_EXCEEDED":
        text = (f"the server at {address} did not answer within {UNARY_TIMEOUT:g}s (DEADLINE_EXCEEDED): "
                "is it a codelane server, and is it overloaded?")
    elif exc.code == "UNIMPLEMENTED":
        # A codelane server implements every method this client calls: what answers gRPC without
        # them is another service, or a server's health-only port (--health-listen).
        text = (f"{address} answers gRPC but not codelane's API ({exc.code}: {exc.message}): is it a server's "
                "--health-listen port, or another service? Give the address the server listens on (--listen)")
    elif exc.code == "UNAUTHENTICATED":
        text = (f"the server at {address} refused the token (UNAUTHENTICATED: {exc.message}): pass --token or "
                "set $CODELANE_TOKEN")
    elif exc.reason == "WORKER_NOT_FOUND":
        text = f"{exc} (see `codelane workers`)"
    elif exc.reason == "SESSION_NOT_FOUND":
        text = f"{exc} (see `codelane sessions`)"
    # The server's messages give an API user's advice (an RPC, a request field): a CLI user is
    # told the command or flag that does it instead.
    elif exc.reason == "TURN_IN_PROGRESS" and exc.metadata.get("session_id"):
        session = exc.metadata["session_id"]
        watch = command_line("codelane watch", session, connection=connection)
        cancel = command_line("codelane cancel", session, connection=connection)
        text = (f"session {session} is already running a turn ({exc.code}): wait for it to end (follow it with "
                f"`{watch}`) or cancel it with `{cancel}`")
    elif exc.reason == "SEQUENCE_OUT_OF_RANGE" and exc.metadata.get("last_sequence"):
        last = exc.metadata["last_sequence"]
        text = f"--after is beyond the session's last event, {last} ({exc.code}): give at most {last}"
    else:
        text = str(exc)
    return f"{prog}: " + " ".join(text.split())


def run_command(prog: str, connection: Connection, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Runs a subcommand's coroutine: a CodelaneError becomes one line on stderr and exit 1,
    Ctrl-C exit 130."""
    try:
        return asyncio.run(main())
    except CodelaneError as exc:
        print(error_line(prog, exc, connection), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return quiet_broken_pipe()


def quiet_broken_pipe() -> int:
    """The reader went away (`| head`): stop quietly, as Unix tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_ERROR


def client_main(parser: argparse.ArgumentParser, argv: Sequence[str],
                body: Callable[[Client, argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    """The whole of a simple client command: parse, connect, run `body(client, args)`, report."""
    args = parse(parser, argv)

    async def main() -> int:
        async with connect(args.connection) as client:
            return await body(client, args)

    return run_command(parser.prog, args.connection, main)


def workspace_path(given: Path | None) -> Path:
    """A --workspace as sessions record it: absolute (relative to the current directory, which it
    defaults to), `~` expanded, symlinks resolved: the server runs in a directory of its own, where a
    relative path would name another workspace."""
    return (given or Path.cwd()).expanduser().resolve()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    """A table on stdout: boxed on a terminal; plain aligned columns, never cut, in a pipe."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
        # Cells are data (a workspace's name, a worker's labels, a tool's): shown as they are, not
        # read as rich's markup (`[red]`), their control characters as text, one line each.
        table.add_row(*(Text(escape_controls(cell, keep_line_breaks=False)) for cell in row))
    if interactive:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()
