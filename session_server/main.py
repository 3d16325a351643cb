"""`codelane server`: run a session server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

from codelane.commands import args as types
from session_server.bus import SUBSCRIBER_BUFFER
from session_server.pool import DEFAULT_HEARTBEAT_TIMEOUT
from session_server.server import LOCAL_WORKER_SLOTS, CodelaneServer, ServerConfig, ServerConfigError
from session_server.sessions import DEFAULT_GENERATE_LIMIT

PROG = "codelane server"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Run a codelane session server, with local tool workers.")
    p.add_argument("--listen", type=types.listen_address, default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port, printed at start)")
    p.add_argument("--data-dir", type=Path, default=Path(".codelane"), metavar="DIR",
                   help="where sessions and events are stored (created if missing)")
    p.add_argument("--model", default="",
                   help="default model, provider:name (openai:..., anthropic:..., scripted:PATH); checked at start")
    p.add_argument("--local-workers", type=types.non_negative_int, default=2, metavar="N",
                   help="tool-worker processes to start on this host; one that exits is replaced")
    p.add_argument("--local-worker-slots", type=types.positive_int, default=LOCAL_WORKER_SLOTS, metavar="N",
                   help="calls each local worker runs at once")
    p.add_argument("--tools", action="append", default=[], metavar="MODULE",
                   help="a module of extra tools (TOOLS = [...]) for the local workers and the server; repeatable")
    p.add_argument("--worker-tools", dest="tools", action=types.Renamed, new="--tools", append=True)
    p.add_argument("--token", default=os.environ.get("CODELANE_TOKEN"),
                   help="bearer token clients must send (default: $CODELANE_TOKEN; none: no check)")
    p.add_argument("--worker-token", default=os.environ.get("CODELANE_WORKER_TOKEN"),
                   help="bearer token workers must send (default: $CODELANE_WORKER_TOKEN; none: no check)")
    p.add_argument("--tls-cert", type=types.readable_file, metavar="FILE", help="server certificate (turns TLS on)")
    p.add_argument("--tls-key", type=types.readable_file, metavar="FILE", help="the certificate's private key")
    p.add_argument("--tls-ca", type=types.readable_file, metavar="FILE",
                   help="CA of client certificates (turns mTLS on)")
    p.add_argument("--no-local-fallback", action="store_true",
                   help="never run Query tools in-process when no worker can (calls then fail)")
    p.add_argument("--heartbeat-timeout", type=types.positive_float, default=DEFAULT_HEARTBEAT_TIMEOUT,
                   metavar="SECONDS", help="worker silence after which it is lost")
    p.add_argument("--max-llm-requests", type=types.positive_int, default=DEFAULT_GENERATE_LIMIT, metavar="N",
                   help="concurrent model requests across all sessions (the Generate lane)")
    p.add_argument("--subscriber-buffer", type=types.positive_int, default=SUBSCRIBER_BUFFER, metavar="EVENTS",
                   help="events an event stream may fall behind before the server cuts it (RESOURCE_EXHAUSTED; "
                        "clients resume)")
    p.add_argument("--log-level", type=types.log_level, default="INFO", metavar="LEVEL",
                   help=f"what the server logs to stderr: {', '.join(types.LOG_LEVELS)} (local workers log "
                        "their warnings, and their debug lines at DEBUG)")
    return p


def _taken(listen: str) -> str | None:
    """Why the address cannot be listened on, checked before gRPC tries (and logs its own lines);
    None when it can, or when only gRPC can tell (a Unix socket, port 0)."""
    if listen.startswith("unix:"):
        return None
    host, _, port = listen.rpartition(":")
    if port == "0":
        return None
    try:
        with socket.create_server((host.strip("[]"), int(port)), family=socket.AF_INET6 if ":" in host
                                  else socket.AF_INET):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        parser.error("--tls-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    why = _taken(args.listen)
    if why is not None:
        print(f"{PROG}: cannot listen on {args.listen}: {why}", file=sys.stderr)
        return 1
    config = ServerConfig(
        listen=args.listen,
        data_dir=args.data_dir,
        local_workers=args.local_workers,
        local_worker_slots=args.local_worker_slots,
        local_worker_tools=args.tools,
        model=args.model,
        token=args.token,
        worker_token=args.worker_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        local_fallback=not args.no_local_fallback,
        heartbeat_timeout=args.heartbeat_timeout,
        max_llm_requests=args.max_llm_requests,
        subscriber_buffer=args.subscriber_buffer,
        # The hub logs each worker that connects or leaves: local workers need not say it too.
        local_worker_log_level="DEBUG" if args.log_level == "DEBUG" else "WARNING",
    )
    try:
        asyncio.run(_serve(config))
    except ServerConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:  # the address is taken, the data directory unwritable, ...
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig) -> None:
    try:
        server = CodelaneServer(config)
    except (ImportError, ValueError) as exc:  # a --tools module that does not load
        raise ServerConfigError(f"cannot load tools: {exc}") from None
    await server.start()
    print(f"codelane server listening on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
