"""`codelane server`: run a session server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from session_server.server import CodelaneServer, ServerConfig
from tool_worker.confinement.policy import (
    GIB,
    MIB,
    MIN_CPU_SECONDS,
    MIN_MEMORY,
    MIN_OPEN_FILES,
    MIN_PROCESSES,
    ResourceLimits,
    SandboxMode,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codelane server", description="Run a codelane session server.")
    p.add_argument("--listen", default="127.0.0.1:50051", help="address to listen on (default 127.0.0.1:50051)")
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
    box = p.add_argument_group("sandbox of bash and execute (see README \"Sandbox\")")
    box.add_argument("--sandbox", type=SandboxMode, choices=list(SandboxMode), default=SandboxMode.WORKSPACE_WRITE,
                     help="mode of sessions that do not choose one (default workspace-write)")
    box.add_argument("--allow-unsandboxed", action="store_true",
                     help="let sessions (and --sandbox) use mode off: commands then run unconfined")
    box.add_argument("--sandbox-allow-network", action="store_true",
                     help="let sessions give their confined commands the host's network")
    box.add_argument("--sandbox-deny-read", action="append", type=Path, default=[], metavar="PATH",
                     help="a path no command may read, besides the data dir, TLS files, ~/.ssh, ~/.aws and "
                          "~/.config/gcloud (repeatable)")
    box.add_argument("--sandbox-protect", action="append", default=[], metavar="PATH",
                     help="a path kept read-only inside workspaces, besides .git/hooks and .git/config; "
                          "relative to each workspace, `*` within one component (repeatable)")
    limits = ResourceLimits()
    box.add_argument("--sandbox-max-processes", type=int, default=limits.processes, metavar="N",
                     help=f"processes of one call at once (default {limits.processes})")
    box.add_argument("--sandbox-max-memory", type=_size, default=limits.memory_bytes, metavar="SIZE",
                     help=f"memory of one call, e.g. 512M, 4G (default {limits.memory_bytes // GIB}G)")
    box.add_argument("--sandbox-max-cpu-seconds", type=int, default=limits.cpu_seconds, metavar="S",
                     help=f"CPU seconds of each process (default {limits.cpu_seconds})")
    box.add_argument("--sandbox-max-open-files", type=int, default=limits.open_files, metavar="N",
                     help=f"open files of each process (default {limits.open_files})")
    p.add_argument("--log-level", default="INFO")
    return p


def _size(text: str) -> int:
    """Bytes from "4G", "512M", "64K" or a plain number."""
    units = {"K": 1024, "M": MIB, "G": GIB}
    try:
        if text[-1:].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 4G") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("codelane server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.local_workers < 0 or args.max_llm_requests < 1:
        print("codelane server: --local-workers must be >= 0 and --max-llm-requests >= 1", file=sys.stderr)
        return 2
    limits = ResourceLimits(
        processes=args.sandbox_max_processes,
        memory_bytes=args.sandbox_max_memory,
        cpu_seconds=args.sandbox_max_cpu_seconds,
        open_files=args.sandbox_max_open_files,
    )
    if (limits.processes < MIN_PROCESSES or limits.memory_bytes < MIN_MEMORY or limits.cpu_seconds < MIN_CPU_SECONDS
            or limits.open_files < MIN_OPEN_FILES):
        print(f"codelane server: sandbox limits must be at least {MIN_PROCESSES} processes, "
              f"{MIN_MEMORY // MIB}M of memory, {MIN_CPU_SECONDS} CPU second and {MIN_OPEN_FILES} open files",
              file=sys.stderr)
        return 2
    config = ServerConfig(
        listen=args.listen,
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
        sandbox=args.sandbox,
        allow_unsandboxed=args.allow_unsandboxed,
        sandbox_allow_network=args.sandbox_allow_network,
        sandbox_limits=limits,
        sandbox_deny_read=args.sandbox_deny_read,
        sandbox_protect=args.sandbox_protect,
    )
    try:
        config.sandbox_settings()
    except ValueError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig) -> None:
    server = CodelaneServer(config)
    await server.start()
    print(server.sandbox.describe(), flush=True)
    print(f"codelane server listening on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
