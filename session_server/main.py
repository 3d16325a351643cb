"""`codelane server`: run a session server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from session_server.server import CodelaneServer, ServerConfig, UnsafeConfig
from tool_worker.child_watcher import install_pidfd_child_watcher
from tool_worker.merkle import DEFAULT_EXCLUDES, Exclusions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codelane server", description="Run a codelane session server.")
    p.add_argument("--listen", action="append", default=None, metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:50051); repeatable, e.g. loopback for clients "
                   "and a LAN address for workers")
    p.add_argument("--data-dir", type=Path, default=Path(".codelane"), help="where sessions and events are stored")
    p.add_argument(
        "--local-workers", type=int, default=2, help="tool-worker processes to start on this host (default 2)"
    )
    p.add_argument("--local-worker-slots", type=int, default=4, help="slots of each local worker (default 4)")
    p.add_argument(
        "--worker-tools",
        action="append",
        default=[],
        metavar="MODULE",
        help="extra tool module loaded by the local workers (repeatable)",
    )
    p.add_argument(
        "--model", default="", help="default model, provider:name (openai:..., anthropic:..., scripted:PATH)"
    )
    p.add_argument("--token", default=os.environ.get("CODELANE_TOKEN"), help="bearer token clients must send")
    p.add_argument(
        "--worker-token", default=os.environ.get("CODELANE_WORKER_TOKEN"), help="bearer token workers must send"
    )
    p.add_argument("--tls-cert", help="server certificate (enables TLS)")
    p.add_argument("--tls-key", help="server private key")
    p.add_argument("--tls-ca", help="CA for client certificates (enables mTLS)")
    p.add_argument(
        "--no-local-fallback",
        action="store_true",
        help="never run Query tools in-process when no worker can (calls then fail)",
    )
    p.add_argument("--heartbeat-timeout", type=float, default=6.0, help="seconds of worker silence before it is lost")
    p.add_argument("--max-llm-requests", type=int, default=16,
                   help="concurrent model requests across all sessions (the Generate lane; default 16)")
    p.add_argument("--snapshot-exclude", action="append", default=None, metavar="PATTERN",
                   help="leave paths matching PATTERN out of workspace snapshots (repeatable; default "
                   f"{' '.join(DEFAULT_EXCLUDES)}; see docs/workspaces.md)")
    p.add_argument("--cas", default="", metavar="ADDR",
                   help="upload workspace snapshots to this REAPI v2 CAS (host:port, grpc:// or grpcs://) and "
                   "have workers fetch from it, instead of serving them from this server")
    p.add_argument("--cas-instance", default="", help="REAPI instance name to use with --cas")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("codelane server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.local_workers < 0 or args.max_llm_requests < 1:
        print("codelane server: --local-workers must be >= 0 and --max-llm-requests >= 1", file=sys.stderr)
        return 2
    listen = args.listen or ["127.0.0.1:50051"]
    try:
        excludes = Exclusions(DEFAULT_EXCLUDES if args.snapshot_exclude is None else args.snapshot_exclude).patterns
    except ValueError as exc:
        print(f"codelane server: --snapshot-exclude: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        listen=listen[0],
        extra_listen=listen[1:],
        snapshot_excludes=list(excludes),
        cas=args.cas,
        cas_instance=args.cas_instance,
        data_dir=args.data_dir,
        local_workers=args.local_workers,
        local_worker_slots=args.local_worker_slots,
        local_worker_tools=args.worker_tools,
        model=args.model,
        token=args.token,
        worker_token=args.worker_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        local_fallback=not args.no_local_fallback,
        heartbeat_timeout=args.heartbeat_timeout,
        max_llm_requests=args.max_llm_requests,
    )
    try:
        asyncio.run(_serve(config))
    except UnsafeConfig as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig) -> None:
    install_pidfd_child_watcher()
    server = CodelaneServer(config)
    await server.start()
    print(f"codelane server listening on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
