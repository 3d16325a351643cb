"""`codelane server`: run a session server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from codelane.transport import address_option
from session_server import admission
from session_server.server import CodelaneServer, ServerConfig, UnsafeConfig
from tool_worker.child_watcher import pidfd_child_watcher
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
from tool_worker.telemetry.config import split_address
from tool_worker.telemetry.logs import LOG_FORMATS, configure_logging

DEFAULT_SHUTDOWN_GRACE = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codelane server", description="Run a codelane session server.")
    p.add_argument("--listen", default="127.0.0.1:50051", type=address_option,
                   help="address to listen on, HOST:PORT (default 127.0.0.1:50051)")
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
    p.add_argument(
        "--scripts-dir", action="append", default=[], type=Path, metavar="DIR",
        help="directory clients may name scripted:PATH models in (repeatable; default: none, clients name no "
        "script files; --model's own script is always allowed)",
    )
    p.add_argument(
        "--workspace-root", action="append", default=[], type=Path, metavar="DIR",
        help="directory sessions may open workspaces in, symlinks resolved (repeatable; default: any directory "
        "this server can read)",
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
    defaults = ResourceLimits()
    box.add_argument("--sandbox-max-processes", type=int, default=defaults.processes, metavar="N",
                     help=f"processes of one call at once (default {defaults.processes})")
    box.add_argument("--sandbox-max-memory", type=_size, default=defaults.memory_bytes, metavar="SIZE",
                     help=f"memory of one call, e.g. 512M, 4G (default {defaults.memory_bytes // GIB}G)")
    box.add_argument("--sandbox-max-cpu-seconds", type=int, default=defaults.cpu_seconds, metavar="S",
                     help=f"CPU seconds of each process (default {defaults.cpu_seconds})")
    box.add_argument("--sandbox-max-open-files", type=int, default=defaults.open_files, metavar="N",
                     help=f"open files of each process (default {defaults.open_files})")
    limits = p.add_argument_group("admission limits (0: none); work over a limit is refused, nothing is queued")
    limits.add_argument("--max-sessions", type=int, default=admission.DEFAULT_MAX_SESSIONS, metavar="N",
                        help="sessions stored (default %(default)s); CreateSession gets RESOURCE_EXHAUSTED")
    limits.add_argument("--max-running-turns", type=int, default=admission.DEFAULT_MAX_RUNNING_TURNS, metavar="N",
                        help="turns running at once across sessions (default %(default)s); SendMessage gets "
                             "RESOURCE_EXHAUSTED")
    limits.add_argument("--max-subscribers", type=int, default=admission.DEFAULT_MAX_SUBSCRIBERS, metavar="N",
                        help="WatchEvents streams open at once (default %(default)s); WatchEvents gets "
                             "RESOURCE_EXHAUSTED")
    limits.add_argument("--max-pending-query-calls", type=int, metavar="N",
                        default=admission.DEFAULT_MAX_PENDING_QUERY_CALLS,
                        help="Query calls not yet finished, across sessions (default %(default)s); a call over it "
                             "gets an AT_CAPACITY error result, the model reads why")
    limits.add_argument("--max-pending-query-calls-per-session", type=int, metavar="N",
                        default=admission.DEFAULT_MAX_PENDING_QUERY_CALLS_PER_SESSION,
                        help="the same, per session (default %(default)s)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    ops.add_argument("--health-listen", metavar="HOST:PORT",
                     help="also serve gRPC health, and only it, in plaintext on HOST:PORT (for probes that "
                          "cannot use the main port's TLS)")
    ops.add_argument("--otlp-endpoint", metavar="URL",
                     help="send traces over OTLP/gRPC, e.g. http://collector:4317 (default: the standard "
                          "OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)")
    ops.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE, metavar="SECONDS",
                     help="on SIGTERM, how long running turns may go on before they are interrupted "
                          "(default %(default)s)")
    ops.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                     help="text, or json: one object per line with session_id, turn_id, call_id, worker_id and "
                          "trace_id where they apply")
    ops.add_argument("--log-level", default="INFO")
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
    try:
        configure_logging(args.log_level, args.log_format, "%(asctime)s %(name)s %(levelname)s %(message)s")
        limits = admission.Limits(
            max_sessions=args.max_sessions,
            max_running_turns=args.max_running_turns,
            max_subscribers=args.max_subscribers,
            max_pending_query_calls=args.max_pending_query_calls,
            max_pending_query_calls_per_session=args.max_pending_query_calls_per_session,
        )
        for address in (args.metrics_listen, args.health_listen):
            if address:
                split_address(address)
    except ValueError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 2
    if args.shutdown_grace < 0:
        print("codelane server: --shutdown-grace must be 0 or more", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("codelane server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.local_workers < 0 or args.max_llm_requests < 1:
        print("codelane server: --local-workers must be >= 0 and --max-llm-requests >= 1", file=sys.stderr)
        return 2
    for flag, directories in (("--scripts-dir", args.scripts_dir), ("--workspace-root", args.workspace_root)):
        missing = [str(d) for d in directories if not d.is_dir()]
        if missing:
            print(f"codelane server: {flag} {missing[0]} is not a directory", file=sys.stderr)
            return 2
    sandbox_limits = ResourceLimits(
        processes=args.sandbox_max_processes,
        memory_bytes=args.sandbox_max_memory,
        cpu_seconds=args.sandbox_max_cpu_seconds,
        open_files=args.sandbox_max_open_files,
    )
    if (sandbox_limits.processes < MIN_PROCESSES or sandbox_limits.memory_bytes < MIN_MEMORY
            or sandbox_limits.cpu_seconds < MIN_CPU_SECONDS or sandbox_limits.open_files < MIN_OPEN_FILES):
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
        scripts_dirs=args.scripts_dir,
        workspace_roots=args.workspace_root,
        limits=limits,
        metrics_listen=args.metrics_listen,
        health_listen=args.health_listen,
        otlp_endpoint=args.otlp_endpoint,
        log_format=args.log_format,
        sandbox=args.sandbox,
        allow_unsandboxed=args.allow_unsandboxed,
        sandbox_allow_network=args.sandbox_allow_network,
        sandbox_limits=sandbox_limits,
        sandbox_deny_read=args.sandbox_deny_read,
        sandbox_protect=args.sandbox_protect,
    )
    try:
        config.sandbox_settings()
    except ValueError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.shutdown_grace))
    except UnsafeConfig as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"codelane server: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig, grace: float) -> None:
    with pidfd_child_watcher():
        await _serve_until_stopped(config, grace)


async def _serve_until_stopped(config: ServerConfig, grace: float) -> None:
    server = CodelaneServer(config)
    await server.start()
    print(server.sandbox.describe(), flush=True)
    print(f"codelane server listening on {server.address}", flush=True)
    if server.metrics_port:
        print(f"codelane server metrics on port {server.metrics_port}", flush=True)
    if server.health_port:
        print(f"codelane server health on port {server.health_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace)
