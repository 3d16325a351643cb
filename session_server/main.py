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
    )
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
