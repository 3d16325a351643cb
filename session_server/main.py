"""`codelane server`: run a session server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
from pathlib import Path

from codelane.commands import args as types
from codelane.transport import parse_address
from session_server import admission
from session_server.bus import SUBSCRIBER_BUFFER, SUBSCRIBER_BUFFER_BYTES
from session_server.llm.factory import missing_key
from session_server.pool import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_MAX_TOOLS
from session_server.server import LOCAL_WORKER_SLOTS, CodelaneServer, ServerConfig, ServerConfigError
from session_server.sessions import DEFAULT_GENERATE_LIMIT
from session_server.store import StoreError
from tool_worker.child_watcher import pidfd_child_watcher
from tool_worker.confinement.policy import (
    GIB,
    HOME_SECRETS,
    MIB,
    MIN_CPU_SECONDS,
    MIN_MEMORY,
    MIN_OPEN_FILES,
    MIN_PROCESSES,
    ResourceLimits,
    SandboxMode,
)
from tool_worker.heap import freeze_startup_heap
from tool_worker.merkle import DEFAULT_EXCLUDES, check_exclusion_pattern
from tool_worker.snapshot_wire import MAX_WORKSPACE_EXCLUDES
from tool_worker.telemetry.config import split_address
from tool_worker.telemetry.logs import LOG_FORMATS, configure_logging, say

PROG = "codelane server"
DEFAULT_SHUTDOWN_GRACE = 10.0
# The deny list's paths inside a workspace travel to workers as that workspace's exclusions
# (WorkspaceSnapshot.exclude, at most MAX_WORKSPACE_EXCLUDES), with the data dir, three TLS files
# and the home's credentials: a longer list would make every worker refuse the workspace's snapshots.
MAX_SANDBOX_DENY_READ = MAX_WORKSPACE_EXCLUDES - 1 - 3 - len(HOME_SECRETS)


def _pattern(text: str) -> str:
    """An exclusion pattern of the workspace digest (workspace.proto, rule 2): the server sends
    workers only patterns the rule calls valid, so an invalid one is refused here."""
    try:
        return check_exclusion_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cas_address(text: str) -> str:
    """--cas: HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT. Anything else (a bare host, an
    http:// URL) was taken, and gRPC then failed every snapshot's upload, turn after turn."""
    if not text:
        return text  # the default: this server serves the snapshots itself
    scheme = next((s for s in ("grpc://", "grpcs://") if text.startswith(s)), "")
    try:
        parse_address(text.removeprefix(scheme))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or grpc://HOST:PORT, grpcs://HOST:PORT for TLS)") from None
    return text


# Below it workers were lost before their first heartbeat (0.001: within 2 ms of each Hello), and
# reconnected and were lost again, for ever.
MIN_HEARTBEAT_TIMEOUT = 1.0


def _heartbeat_timeout(text: str) -> float:
    seconds = types.positive_float(text)
    if seconds < MIN_HEARTBEAT_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text} s is too short: it must be at least {MIN_HEARTBEAT_TIMEOUT:g} s "
                                         "(it is in seconds; workers heartbeat every third of it)")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Run a codelane session server, with local tool workers.")
    p.add_argument("--listen", action="append", type=types.listen_address, default=None, metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:50051; port 0: any free port, printed at start); "
                        "repeatable, e.g. loopback for clients and a LAN address for workers")
    p.add_argument("--data-dir", type=types.directory_to_make("/var/lib/codelane"), default=Path(".codelane"),
                   metavar="DIR",
                   help="where sessions and events are stored (created if missing)")
    p.add_argument("--model", default="",
                   help="default model, provider:name (openai:..., anthropic:..., scripted:PATH); checked at start "
                   "(default: none: every session must then name its model)")
    p.add_argument("--local-workers", type=types.non_negative_int, default=2, metavar="N",
                   help="tool-worker processes to start on this host; one that exits is replaced")
    p.add_argument("--workers", dest="local_workers", type=types.non_negative_int, action=types.Renamed,
                   new="--local-workers")
    p.add_argument("--local-worker-slots", type=types.positive_int, default=LOCAL_WORKER_SLOTS, metavar="N",
                   help="calls each local worker runs at once")
    p.add_argument("--tools", action="append", default=[], metavar="MODULE",
                   help="a module of extra tools (TOOLS = [...]) for the local workers and the server; repeatable")
    p.add_argument("--worker-tools", dest="tools", action=types.Renamed, new="--tools", append=True)
    p.add_argument("--token", default=os.environ.get("CODELANE_TOKEN"), type=types.bearer_token,
                   help="bearer token clients must send (default: $CODELANE_TOKEN; none: no check)")
    p.add_argument("--worker-token", default=os.environ.get("CODELANE_WORKER_TOKEN"), type=types.bearer_token,
                   help="bearer token workers must send (default: $CODELANE_WORKER_TOKEN, or one generated for "
                        "the local workers; see README \"Security\")")
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
    p.add_argument("--tls-cert", type=types.readable_file, metavar="FILE", help="server certificate (turns TLS on)")
    p.add_argument("--tls-key", type=types.readable_file, metavar="FILE", help="the certificate's private key")
    p.add_argument("--tls-ca", type=types.readable_file, metavar="FILE",
                   help="CA of client certificates (turns mTLS on)")
    p.add_argument(
        "--no-local-fallback",
        action="store_true",
        help="never run Query tools in-process when no worker can (calls then fail)",
    )
    p.add_argument(
        "--local-query-tools", default="", metavar="TOOLS",
        help="comma-separated Query tools to run in-process even when workers offer them, where dispatching "
        "a call costs more than running it (e.g. read: see docs/performance.md); default: none",
    )
    p.add_argument(
        "--no-local-cheap-calls", action="store_true",
        help="send every Query call a worker can take to a worker, even those cheaper to run here (by default a "
        "read of a file of at most 64 KiB runs in the server: see docs/performance.md)",
    )
    p.add_argument("--heartbeat-timeout", type=_heartbeat_timeout, default=DEFAULT_HEARTBEAT_TIMEOUT,
                   metavar="SECONDS", help="worker silence after which it is lost (workers send heartbeats "
                   "every 2 s, or every third of it when that is shorter)")
    p.add_argument("--max-llm-requests", type=types.positive_int, default=DEFAULT_GENERATE_LIMIT, metavar="N",
                   help="concurrent model requests across all sessions (the Generate lane)")
    p.add_argument("--subscriber-buffer", type=types.positive_int, default=SUBSCRIBER_BUFFER, metavar="EVENTS",
                   help="live events an event stream holds for a slow reader before it reads what the reader "
                        "missed from the store instead (memory per stream; no reader is ever cut off)")
    p.add_argument("--subscriber-buffer-bytes", type=types.positive_size, default=SUBSCRIBER_BUFFER_BYTES,
                   metavar="SIZE", help="the same bound in size, e.g. 512K, 16M (default "
                        f"{SUBSCRIBER_BUFFER_BYTES // MIB}M; events with big tool outputs reach it first)")
    box = p.add_argument_group("sandbox of bash and execute (see README \"Sandbox\")")
    box.add_argument("--sandbox", type=SandboxMode, choices=list(SandboxMode), default=SandboxMode.WORKSPACE_WRITE,
                     help="mode of sessions that do not choose one (default workspace-write)")
    box.add_argument("--allow-unsandboxed", action="store_true",
                     help="let sessions (and --sandbox) use mode off: commands then run unconfined")
    box.add_argument("--sandbox-allow-network", action="store_true",
                     help="let sessions give their confined commands the host's network")
    box.add_argument("--sandbox-deny-read", action="append", type=Path, default=[], metavar="PATH",
                     help="a path no command may read, besides the data dir, TLS files, ~/.ssh, ~/.aws, "
                          "~/.config/gcloud and ~/.config/codelane (repeatable)")
    box.add_argument("--sandbox-protect", action="append", default=[], metavar="PATH",
                     help="a path kept read-only inside workspaces, besides .git/hooks and .git/config; "
                          "relative to each workspace, `*` within one component (repeatable)")
    defaults = ResourceLimits()
    box.add_argument("--sandbox-max-processes", type=int, default=defaults.processes, metavar="N",
                     help=f"processes of one call at once (default {defaults.processes})")
    box.add_argument("--sandbox-max-memory", type=types.positive_size, default=defaults.memory_bytes, metavar="SIZE",
                     help=f"memory of one call, e.g. 512M, 4G (default {defaults.memory_bytes // GIB}G)")
    box.add_argument("--sandbox-max-cpu-seconds", type=int, default=defaults.cpu_seconds, metavar="S",
                     help=f"CPU seconds of each process (default {defaults.cpu_seconds})")
    box.add_argument("--sandbox-max-open-files", type=int, default=defaults.open_files, metavar="N",
                     help=f"open files of each process (default {defaults.open_files})")
    limits = p.add_argument_group("admission limits (0: none); work over a limit is refused, nothing is queued")
    limits.add_argument("--max-sessions", type=types.non_negative_int, metavar="N",
                        default=admission.DEFAULT_MAX_SESSIONS,
                        help="sessions stored (default %(default)s); CreateSession gets RESOURCE_EXHAUSTED")
    limits.add_argument("--max-running-turns", type=types.non_negative_int, metavar="N",
                        default=admission.DEFAULT_MAX_RUNNING_TURNS,
                        help="turns running at once across sessions (default %(default)s); SendMessage gets "
                             "RESOURCE_EXHAUSTED")
    limits.add_argument("--max-subscribers", type=types.non_negative_int, metavar="N",
                        default=admission.DEFAULT_MAX_SUBSCRIBERS,
                        help="WatchEvents streams open at once (default %(default)s); WatchEvents gets "
                             "RESOURCE_EXHAUSTED")
    limits.add_argument("--max-pending-query-calls", type=types.non_negative_int, metavar="N",
                        default=admission.DEFAULT_MAX_PENDING_QUERY_CALLS,
                        help="Query calls not yet finished, across sessions (default %(default)s); a call over it "
                             "gets an AT_CAPACITY error result, the model reads why")
    limits.add_argument("--max-pending-query-calls-per-session", type=types.non_negative_int, metavar="N",
                        default=admission.DEFAULT_MAX_PENDING_QUERY_CALLS_PER_SESSION,
                        help="the same, per session (default %(default)s)")
    limits.add_argument("--max-tools", type=types.non_negative_int, metavar="N", default=DEFAULT_MAX_TOOLS,
                        help="tool names offered to models, the server's own and its workers' together (default "
                             "%(default)s: OpenAI's models take at most 128 a request); a worker whose Hello adds "
                             "names past it is refused with RESOURCE_EXHAUSTED and retries")
    content = p.add_argument_group("workspaces by content (see docs/workspaces.md)")
    content.add_argument("--snapshot-exclude", action="append", default=None, metavar="PATTERN", type=_pattern,
                         help="leave paths matching PATTERN out of workspace snapshots (repeatable; default "
                              f"{' '.join(DEFAULT_EXCLUDES)}, which patterns given replace)")
    content.add_argument("--cas", default="", metavar="ADDR", type=_cas_address,
                         help="upload workspace snapshots to this REAPI v2 CAS (host:port, grpc:// or grpcs://) and "
                              "have workers fetch from it, instead of serving them from this server")
    content.add_argument("--cas-instance", default="", metavar="NAME", help="REAPI instance name to use with --cas")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    ops.add_argument("--health-listen", metavar="HOST:PORT",
                     help="also serve gRPC health, and only it, in plaintext on HOST:PORT (for probes that "
                          "cannot use the main port's TLS)")
    ops.add_argument("--otlp-endpoint", type=types.otlp_endpoint, metavar="URL",
                     help="send traces over OTLP/gRPC, e.g. http://collector:4317 (default: the standard "
                          "OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)")
    ops.add_argument("--shutdown-grace", type=types.non_negative_float, metavar="SECONDS",
                     default=DEFAULT_SHUTDOWN_GRACE,
                     help="on SIGTERM, how long running turns may go on before they are interrupted "
                          "(default %(default)s)")
    ops.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                     help="text, or json: one object per line with session_id, turn_id, call_id, worker_id and "
                          "trace_id where they apply")
    ops.add_argument("--log-level", type=types.log_level, default="INFO", metavar="LEVEL",
                     help=f"what the server logs to stderr: {', '.join(types.LOG_LEVELS)} (local workers log "
                          "their warnings, and everything at DEBUG)")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cas_instance and not args.cas:
        # The server's own CAS has no instances: the name went unused, unsaid.
        parser.error("--cas-instance names an instance of the CAS of --cas: give --cas too")
    twice = next((address for address in args.listen or [] if args.listen.count(address) > 1), None)
    if twice is not None:  # the second bind failed, and the server said another server held the port
        parser.error(f"--listen gives {twice} twice")
    try:
        configure_logging(args.log_level, args.log_format, "%(asctime)s %(name)s %(levelname)s %(message)s")
        for notice in types.renamed_notices(args):
            say(PROG, notice, logging.WARNING)
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
        say(PROG, str(exc))
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        parser.error("--tls-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
    if len(args.sandbox_deny_read) > MAX_SANDBOX_DENY_READ:
        parser.error(f"--sandbox-deny-read is given {len(args.sandbox_deny_read):,} times; at most "
                     f"{MAX_SANDBOX_DENY_READ:,}: deny a directory that holds the paths instead")
    for flag, directories in (("--scripts-dir", args.scripts_dir), ("--workspace-root", args.workspace_root)):
        missing = [str(d) for d in directories if not d.is_dir()]
        if missing:
            say(PROG, f"{flag} {missing[0]} is not a directory")
            return 2
    sandbox_limits = ResourceLimits(
        processes=args.sandbox_max_processes,
        memory_bytes=args.sandbox_max_memory,
        cpu_seconds=args.sandbox_max_cpu_seconds,
        open_files=args.sandbox_max_open_files,
    )
    if (sandbox_limits.processes < MIN_PROCESSES or sandbox_limits.memory_bytes < MIN_MEMORY
            or sandbox_limits.cpu_seconds < MIN_CPU_SECONDS or sandbox_limits.open_files < MIN_OPEN_FILES):
        say(PROG, f"sandbox limits must be at least {MIN_PROCESSES} processes, {MIN_MEMORY // MIB}M of memory, "
                  f"{MIN_CPU_SECONDS} CPU second and {MIN_OPEN_FILES} open files")
        return 2
    listen = args.listen or ["127.0.0.1:50051"]
    excludes = DEFAULT_EXCLUDES if args.snapshot_exclude is None else tuple(args.snapshot_exclude)
    config = ServerConfig(
        listen=listen[0],
        extra_listen=listen[1:],
        snapshot_excludes=list(excludes),
        cas=args.cas,
        cas_instance=args.cas_instance,
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
        local_query_tools=[name.strip() for name in args.local_query_tools.split(",") if name.strip()],
        local_cheap_calls=not args.no_local_cheap_calls,
        heartbeat_timeout=args.heartbeat_timeout,
        max_tools=args.max_tools,
        max_llm_requests=args.max_llm_requests,
        subscriber_buffer=args.subscriber_buffer,
        subscriber_buffer_bytes=args.subscriber_buffer_bytes,
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
        # The hub logs each worker that connects or leaves: local workers need not say it too.
        local_worker_log_level="DEBUG" if args.log_level == "DEBUG" else "WARNING",
    )
    try:
        config.sandbox_settings()
    except ValueError as exc:
        say(PROG, str(exc))
        return 2
    try:
        second_signal = asyncio.run(_serve(config, args.shutdown_grace))
    except ServerConfigError as exc:  # an open hub, a default model that cannot work, a TLS file
        say(PROG, str(exc))
        return 2
    # The address is taken, the data directory unwritable, the store read-only or not one, ...
    except (OSError, sqlite3.Error, StoreError) as exc:
        say(PROG, str(exc))
        return 1
    # Stopped in order either way; 128 + the signal says the grace was cut short, as a worker says it.
    return 0 if second_signal is None else 128 + second_signal


async def _serve(config: ServerConfig, grace: float) -> signal.Signals | None:
    with pidfd_child_watcher():
        return await _serve_until_stopped(config, grace)


async def _serve_until_stopped(config: ServerConfig, grace: float) -> signal.Signals | None:
    """Serves until SIGTERM or SIGINT, then stops; returns the second signal when one cut the stop's
    grace short."""
    try:
        server = CodelaneServer(config)
    except (ImportError, ValueError) as exc:  # a --tools module that does not load
        raise ServerConfigError(f"cannot load tools: {exc}") from None
    try:
        await server.start()
    except BaseException:
        # What a start that failed half-way had started (the gRPC server, the local workers) stops
        # now, on this loop: left to the collector, gRPC's server logged tracebacks after the one
        # line that says why (a metrics port in use). Quietly: that line is all the user needs.
        logging.disable(logging.WARNING)
        await server.stop(0)
        raise
    signals = _Signals(grace)
    try:
        await _announce_and_wait(server, config, signals)
    finally:
        # Also when the task is cancelled instead: a Ctrl-C in the moment before the handlers
        # below are in place reaches us as asyncio.run's cancellation of this task, and left the
        # server running (its gRPC threads, local workers and data directory lock) and the
        # process hung on its way out.
        await server.stop(grace, hurry=signals.hurry)
    return signals.second


class _Signals:
    """The operator's SIGTERMs and SIGINTs: the first stops the server, giving running turns their
    grace; a second (a second Ctrl-C) ends that grace at once. The stop is still orderly: those
    turns end interrupted, with their events stored."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.second: signal.Signals | None = None

    def received(self, sig: signal.Signals) -> None:
        log = logging.getLogger("codelane.server")
        if not self.stop.is_set():
            log.info("%s: stopping: running turns get %gs to finish (a second SIGTERM or SIGINT interrupts them "
                     "now)", sig.name, self.grace)
            self.stop.set()
        elif not self.hurry.is_set():
            log.warning("%s again: interrupting the running turns now", sig.name)
            self.second = sig
            self.hurry.set()


async def _announce_and_wait(server: CodelaneServer, config: ServerConfig, signals: _Signals) -> None:
    freeze_startup_heap()
    # stdout holds the one "listening" line that scripts wait for; what the sandbox enforces is
    # logged (stderr, in the chosen --log-format), as a warning when commands cannot be confined.
    level = logging.WARNING if server.sandbox.support().problem else logging.INFO
    logging.getLogger("codelane.server").log(level, "%s", server.sandbox.describe())
    if not config.model:
        logging.getLogger("codelane.server").info(
            "no default model (--model): every session must name its own (codelane run --model provider:name)")
    elif (key := missing_key(config.model)) is not None:
        # Not refused: a session may name another model. Said, or the first turn is where it shows.
        logging.getLogger("codelane.server").warning(
            "the default model %s needs $%s, which is not set in the server's environment: its turns will fail "
            "(401) until the server is started with it", config.model, key)
    print(f"codelane server listening on {server.address}", flush=True)
    # Each further --listen too: one of port 0 got a free port that only this line tells.
    for address, port in zip(config.extra_listen, server.ports[1:], strict=True):
        print(f"codelane server also listening on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    if server.metrics_port:
        print(f"codelane server metrics on port {server.metrics_port}", flush=True)
    if server.health_port:
        print(f"codelane server health on port {server.health_port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.received, sig)
    await signals.stop.wait()
