"""Assembles the session server: gRPC services, worker pool, local workers, metrics, tracing and
health; starts it, and stops it with shutdown going first (nothing new is admitted, what runs
finishes or is interrupted, then everything closes)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from codelane.transport import SERVER_OPTIONS, check_tls_files
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, worker_pb2, worker_pb2_grpc
from session_server.admission import Admission, Limits
from session_server.api import grpc_logs
from session_server.api.admin import AdminServicer
from session_server.api.auth import BearerTokenInterceptor
from session_server.api.content import (
    BYTESTREAM_SERVICE,
    CAS_SERVICE,
    add_content_services,
)
from session_server.api.decoding import DecodingInterceptor
from session_server.api.hub import WorkerHubServicer
from session_server.api.observe import ObservingInterceptor
from session_server.api.reflection import enable_reflection
from session_server.api.sessions import SessionServicer
from session_server.api.store_failures import StoreFailureInterceptor
from session_server.bus import SUBSCRIBER_BUFFER, SUBSCRIBER_BUFFER_BYTES
from session_server.content import ContentStore
from session_server.external_cas import ExternalCas
from session_server.llm.factory import ScriptLibrary, create_provider, parse_model
from session_server.metrics import BacklogEntry, ServerMetrics, StateCollector, label_set
from session_server.pool import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_TOOLS,
    DEFAULT_NO_WORKER_WAIT,
    WorkerPool,
)
from session_server.readiness import DEFAULT_STORE_CHECK_INTERVAL, Readiness, watch_store
from session_server.sessions import DEFAULT_GENERATE_LIMIT, SessionManager
from session_server.snapshots import SnapshotRegistry
from session_server.stats import LaneStats
from session_server.store import Store, unusable_at_start
from session_server.telemetry import Telemetry
from tool_worker.confinement.launcher import Sandbox
from tool_worker.confinement.policy import DEFAULT_PROTECTED, ResourceLimits, SandboxMode, SandboxSettings
from tool_worker.confinement.protected import operator_excludes_inside
from tool_worker.filelock import try_lock
from tool_worker.merkle import DEFAULT_EXCLUDES
from tool_worker.registry import ToolRegistry
from tool_worker.telemetry import logs as log_context
from tool_worker.telemetry.config import split_address, start_tracing
from tool_worker.telemetry.endpoints import MetricsEndpoint, bind_errors, refuse_unbindable, serve_health
from tool_worker.tools.base import Lane
from tool_worker.worker import EXIT_REJECTED, EXIT_UNAUTHENTICATED

log = logging.getLogger("codelane.server")

LOCAL_WORKER_SLOTS = 4
# Once the turns are over, what the gRPC server still waits for at a stop: unary calls in flight
# finish in it, and so do the event streams and claims the sessions end (SHUTTING_DOWN); what
# is still open when it runs out (health watches, a stream whose reader does not read its end)
# is cut.
RPC_STOP_GRACE = 2.0


# A local worker that exits is replaced. One that lived at least LOCAL_WORKER_HEALTHY seconds is
# replaced at once; one that died younger waits LOCAL_WORKER_RESTART_DELAY, doubled per early
# death up to LOCAL_WORKER_RESTART_MAX, so a worker that cannot start does not spin.
LOCAL_WORKER_HEALTHY = 10.0
LOCAL_WORKER_RESTART_DELAY = 0.5
LOCAL_WORKER_RESTART_MAX = 30.0


class ServerConfigError(ValueError):
    """The server cannot start with this configuration (a model, a file, an address); the message
    says which and why."""


class UnsafeConfig(ServerConfigError):
    """The server would run with a door open; the message says which flag closes it."""


def _check_local_query_tools(config: ServerConfig, registry: ToolRegistry) -> None:
    for name in config.local_query_tools:
        tool = registry.get(name)
        if tool is None or tool.spec.lane is not Lane.QUERY:
            offered = ", ".join(spec.name for spec in registry.specs(Lane.QUERY))
            raise ServerConfigError(
                f"--local-query-tools: {name!r} is not one of this server's Query tools ({offered})"
            )
        if tool.spec.required_labels:
            labels = ", ".join(f"{key}={value}" for key, value in sorted(tool.spec.required_labels.items()))
            raise ServerConfigError(f"--local-query-tools: {name!r} runs only on workers labelled {labels}, and "
                                    "the server carries no labels")
    if config.local_query_tools and not config.local_fallback:
        raise ServerConfigError("--local-query-tools runs Query tools in-process, which --no-local-fallback forbids: "
                                "choose one")


def _check_tls_files(config: ServerConfig) -> None:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ServerConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    for what, path in (("TLS certificate", config.tls_cert), ("TLS key", config.tls_key),
                       ("TLS client CA", config.tls_ca)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ServerConfigError(f"{what} {path}: not a readable file")
    try:
        check_tls_files(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca, ca_name="TLS client CA")
    except ValueError as exc:
        raise ServerConfigError(str(exc)) from None


def is_loopback(listen: str) -> bool:
    """Whether a listen address only accepts connections from this host."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lock_data_dir(data_dir: Path) -> int:
    """Takes the data directory for this server (an flock on `<data_dir>/lock`, held until
    `stop()`) and returns the lock's descriptor; raises OSError (one line) when another server
    holds it. A second server on one data directory would take the first one's running turns
    for a crash's (ending them) and its sandboxed commands for leftovers (killing them), and
    both would number the same sessions' events."""
    path = data_dir / "lock"
    try:
        lock = try_lock(str(path))
    except OSError as exc:  # a directory the server cannot write (it said "[Errno 13] Permission denied: ...")
        raise OSError(f"cannot use the data directory {data_dir}: {path}: {exc.strerror or exc}: the server must "
                      "be able to write there") from None
    if lock is None:
        with open(path, "rb") as held:
            holder = held.read(32).decode("ascii", "replace").strip()
        who = f"another codelane server (pid {holder})" if holder.isdigit() else "another codelane server"
        raise OSError(
            f"the data directory {data_dir} is in use by {who}: stop it, or give this server its own --data-dir"
        )
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    return lock


def _refuse_port_in_use(listen: str) -> None:
    """Raises OSError (one line) when another process listens on `listen` already, or when its
    host is unknown or none of this host's addresses.

    gRPC would say so too, with SO_REUSEPORT off, but only after logging its own lines; this
    checks first by binding the address the way gRPC will.
    """
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or listen.startswith(("unix:", "unix-abstract:", "dns:")):
        return
    try:
        addresses, errors = bind_errors(host.strip("[]"), int(port))
    except socket.gaierror as exc:
        # gRPC logged its own line, then the server called the address in use, its data dir made.
        raise OSError(f"cannot listen on {listen}: {host}: {exc.strerror}") from None
    if any(exc.errno == errno.EADDRINUSE for exc in errors):
        raise OSError(f"cannot listen on {listen}: the address is in use (is another codelane server running?)")
    foreign = sum(exc.errno == errno.EADDRNOTAVAIL for exc in errors)
    if addresses and foreign == addresses:  # gRPC listens when any of them binds
        raise OSError(f"cannot listen on {listen}: {host} is not an address of this host")


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path(".codelane")
    local_workers: int = 0
    local_worker_slots: int = LOCAL_WORKER_SLOTS
    local_worker_tools: list[str] = field(default_factory=list)
    model: str = ""
    token: str | None = None
    worker_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    local_fallback: bool = True
    # Query tools that run in-process even when workers offer them (the placement rule).
    local_query_tools: list[str] = field(default_factory=list)
    # Query calls cheaper here than on a worker (a read of a small file) run here (when
    # local_fallback allows Query tools here at all).
    local_cheap_calls: bool = True
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    no_worker_wait: float = DEFAULT_NO_WORKER_WAIT
    # Tool names the server and its workers may offer models together (0: no limit).
    max_tools: int = DEFAULT_MAX_TOOLS
    subscriber_buffer: int = SUBSCRIBER_BUFFER
    subscriber_buffer_bytes: int = SUBSCRIBER_BUFFER_BYTES
    max_llm_requests: int = DEFAULT_GENERATE_LIMIT
    # Directories clients may name `scripted:PATH` models in (none: clients name no script files).
    scripts_dirs: list[Path] = field(default_factory=list)
    # Directories sessions may open workspaces in (none: any directory the server can read).
    workspace_roots: list[Path] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    # Side endpoints: Prometheus /metrics over HTTP, and a plaintext port serving only gRPC health.
    metrics_listen: str | None = None
    health_listen: str | None = None
    # OTLP/gRPC endpoint for traces; None: the standard OTEL_* variables decide (unset: off).
    otlp_endpoint: str | None = None
    store_check_interval: float = DEFAULT_STORE_CHECK_INTERVAL
    # Passed on to the local workers.
    log_format: str = "text"
    # The sandbox of bash and execute (README "Sandbox"): sessions' default mode, whether they may
    # turn it off or use the network, their limits, and what no command may read or change.
    sandbox: SandboxMode = SandboxMode.WORKSPACE_WRITE
    allow_unsandboxed: bool = False
    sandbox_allow_network: bool = False
    sandbox_limits: ResourceLimits = field(default_factory=ResourceLimits)
    sandbox_deny_read: list[Path] = field(default_factory=list)
    sandbox_protect: list[str] = field(default_factory=list)

    # Local workers log their warnings (DEBUG: everything).
    local_worker_log_level: str = "WARNING"

    def sandbox_settings(self) -> SandboxSettings:
        """Raises ValueError when the default mode is off without --allow-unsandboxed."""
        if self.sandbox is SandboxMode.OFF and not self.allow_unsandboxed:
            raise ValueError("--sandbox off needs --allow-unsandboxed: commands would run unconfined")
        data_dir = Path(os.path.realpath(self.data_dir))
        tls = [Path(p) for p in (self.tls_cert, self.tls_key, self.tls_ca) if p]
        return SandboxSettings(
            default_mode=self.sandbox,
            allow_unsandboxed=self.allow_unsandboxed,
            allow_network=self.sandbox_allow_network,
            limits=self.sandbox_limits,
            deny_read=tuple(Path(os.path.abspath(p)) for p in [data_dir, *tls, *self.sandbox_deny_read]),
            protect=(*DEFAULT_PROTECTED, *self.sandbox_protect),
            # The data dir names the server: its restart finds what its crash left running.
            owner=hashlib.sha256(str(data_dir).encode()).hexdigest()[:16],
        )
    # More addresses to serve on, besides `listen` (e.g. loopback for clients and a LAN address
    # for workers); each gets its own port when it asks for port 0.
    extra_listen: list[str] = field(default_factory=list)
    # Exclusion patterns of the workspace digest, sent to workers.
    snapshot_excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    # An external REAPI CAS to upload snapshots to, which workers then fetch from ("" = serve
    # them here), and its instance name.
    cas: str = ""
    cas_instance: str = ""


class CodelaneServer:
    """One session server. `await start()` binds and returns the port; `await stop()` drains."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.external_cas = ExternalCas(config.cas, config.cas_instance) if config.cas else None
        sandbox_settings = config.sandbox_settings()
        self.snapshots = SnapshotRegistry(
            config.snapshot_excludes,
            publish=self.external_cas.publish if self.external_cas else None,
            # The operator's deny list never travels: no snapshot names what it holds.
            workspace_excludes=functools.partial(operator_excludes_inside, sandbox_settings),
        )
        self.content = ContentStore(self.snapshots)
        self.sandbox = Sandbox(sandbox_settings, keep_warm=True)
        self.registry = ToolRegistry.builtin(self.sandbox)
        for module in config.local_worker_tools:
            self.registry.load_module(module)
        self.pool = WorkerPool(
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            no_worker_wait=config.no_worker_wait,
            on_worker_lost=lambda cause: self.metrics.workers_lost.labels(cause).inc(),
            on_refused=lambda limit: self.metrics.admission_refusals.labels(limit).inc(),
            server_execute_tools=frozenset(spec.name for spec in self.registry.specs(Lane.EXECUTE)),
            server_tools=frozenset(self.registry.names()),
            max_tools=config.max_tools,
        )
        self.stats = LaneStats()
        self.store: Store | None = None
        self._data_dir_lock: int | None = None
        self.sessions: SessionManager | None = None
        self.admission: Admission | None = None
        self.telemetry = Telemetry(self.metrics)
        self.readiness = Readiness(self._readiness_changed)
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._health_server: grpc.aio.Server | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.ports: list[int] = []
        self._server: grpc.aio.Server | None = None
        # Local workers dial a hub of their own on an abstract unix socket: reachable from this
        # host only, it serves nothing but the hub (so it never bypasses the clients' TLS or
        # mTLS), and it wants a token only this process knows.
        self._local_hub: grpc.aio.Server | None = None
        self.local_hub_address = ""
        self._local_token = config.worker_token or secrets.token_urlsafe(32)
        self._health = health.aio.HealthServicer()
        self._health_names: list[str] = []
        # Local workers by id: the process now running (None between two), and its supervisor.
        self._local: dict[str, asyncio.subprocess.Process | None] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def hub_token(self) -> str | None:
        """The token the hub requires of workers on the public address (None: open).

        The hub is never open while clients need a token, nor off loopback: there, without a
        worker token or mTLS, `start()` refuses to run.
        """
        config = self.config
        if config.worker_token:
            return config.worker_token
        exposed = [a for a in [config.listen, *config.extra_listen] if not is_loopback(a)]
        if exposed and not config.tls_ca:
            raise UnsafeConfig(
                f"the worker hub would accept any worker on {exposed[0]}: add --worker-token TOKEN "
                "(or require client certificates with --tls-ca), or listen on 127.0.0.1"
            )
        if config.token:
            return self._local_token
        return None

    async def start(self) -> int:
        hub_token = self.hub_token()
        grpc_logs.install()
        # First: a second server on a busy port, a default model that cannot work or a TLS file
        # that does not load says so in one line, having touched nothing.
        for address in [self.config.listen, *self.config.extra_listen]:
            _refuse_port_in_use(address)
        # The side ports too: found once the server ran, they left a new data dir and store behind.
        for side, what in ((self.config.metrics_listen, "metrics"), (self.config.health_listen, "gRPC health")):
            if side:
                refuse_unbindable(*split_address(side), f"cannot serve {what} on {side}")
        await self._check_config()
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on its path, a read-only filesystem: which, not Errno's words alone
            raise OSError(f"cannot create the data directory {self.config.data_dir}: {exc.strerror or exc}") from None
        self._data_dir_lock = _lock_data_dir(self.config.data_dir)
        # Before anything runs: end what a crash of this server left, and learn what the host enforces
        # (`codelane server` prints it: `sandbox.describe()`).
        await asyncio.to_thread(self.sandbox.start)
        store_path = self.config.data_dir / "codelane.db"
        self.store = Store(store_path)
        self.telemetry = Telemetry(self.metrics, start_tracing(self.config.otlp_endpoint, "codelane-server"))
        try:
            sessions = self.store.count_sessions()
        except sqlite3.Error as exc:  # a damaged page: which file, and what to do, not SQLite's words alone
            raise unusable_at_start(store_path, exc) from exc
        self.admission = Admission(self.config.limits, sessions=sessions, metrics=self.metrics)
        self.sessions = SessionManager(
            self.store, self.pool, self.registry, self.stats,
            default_model=self.config.model, local_fallback=self.config.local_fallback,
            local_query_tools=frozenset(self.config.local_query_tools),
            local_cheap_calls=self.config.local_cheap_calls,
            subscriber_buffer=self.config.subscriber_buffer,
            subscriber_buffer_bytes=self.config.subscriber_buffer_bytes,
            generate_limit=self.config.max_llm_requests,
            scripts_dirs=self.config.scripts_dirs,
            workspace_roots=self.config.workspace_roots,
            data_dir=self.config.data_dir,
            telemetry=self.telemetry,
            admission=self.admission,
            on_store_state=lambda ok, why: self.readiness.set("event_log", ok, why),
            snapshots=self.snapshots,
        )
        try:
            await self.sessions.recover()
        except sqlite3.Error as exc:  # reading an interrupted turn's events met a damaged page
            raise unusable_at_start(store_path, exc) from exc
        self.pool.start()
        self.metrics.registry.register(StateCollector(_ServerState(self)))
        server = grpc.aio.server(
            interceptors=[ObservingInterceptor(self.telemetry), BearerTokenInterceptor(self.config.token, hub_token),
                          DecodingInterceptor(), StoreFailureInterceptor()],
            options=SERVER_OPTIONS,
        )
        hub = WorkerHubServicer(self.pool, self._content_source())
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, server)
        if self.external_cas is None:
            self._add_content_services(server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.pool, self.stats, time.time()), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            *([] if self.external_cas else [CAS_SERVICE, BYTESTREAM_SERVICE]),
            health.SERVICE_NAME,
        ]
        enable_reflection(names, server)
        for address in [self.config.listen, *self.config.extra_listen]:
            try:
                if self.config.tls_cert and self.config.tls_key:
                    port = server.add_secure_port(address, self._server_credentials())
                else:
                    port = server.add_insecure_port(address)
            except RuntimeError:
                port = 0
            if port == 0:
                # SO_REUSEPORT is off (transport.SERVER_OPTIONS), so a port in use is refused here.
                raise OSError(
                    f"cannot listen on {address}: the address is in use (another codelane server?) "
                    "or not available on this host"
                )
            self.ports.append(port)
        self.port = self.ports[0]
        if self.external_cas is not None:
            await self.external_cas.connect()
        await server.start()
        self._server = server
        if self.config.local_workers > 0:
            await self._start_local_hub(hub)
        if self.config.metrics_listen:
            self._metrics_endpoint = MetricsEndpoint(self.config.metrics_listen, self.metrics.registry)
            self.metrics_port = await self._metrics_endpoint.start()
        if self.config.health_listen:
            self._health_server, self.health_port = await serve_health(self.config.health_listen, self._health)
        self._health_names = [*names[:3], ""]
        await self._set_health(self.readiness.serving)
        self._keep(asyncio.create_task(
            watch_store(self.config.data_dir / "codelane.db", self.readiness, self.config.store_check_interval),
            name="store-probe",
        ))
        self._start_local_workers()
        return self.port

    def _content_source(self) -> worker_pb2.ContentSource:
        source = worker_pb2.ContentSource(exclude=self.snapshots.excludes, max_batch_bytes=self.content.max_batch_bytes)
        if self.external_cas is not None:
            source.address, source.instance_name = self.config.cas, self.config.cas_instance
        return source

    def _add_content_services(self, server: grpc.aio.Server) -> None:
        add_content_services(server, self.content)

    def _server_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        return grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            require_client_auth=bool(config.tls_ca),
        )

    async def _start_local_hub(self, hub: WorkerHubServicer) -> None:
        local = grpc.aio.server(
            interceptors=[ObservingInterceptor(self.telemetry), BearerTokenInterceptor(None, self._local_token),
                          StoreFailureInterceptor()],
            options=SERVER_OPTIONS,
        )
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, local)
        if self.external_cas is None:
            self._add_content_services(local)
        self.local_hub_address = f"unix-abstract:codelane-hub-{os.getpid()}-{secrets.token_hex(8)}"
        if local.add_insecure_port(self.local_hub_address) == 0:
            raise OSError(f"cannot listen on {self.local_hub_address} for the local workers")
        await local.start()
        self._local_hub = local

    async def _check_config(self) -> None:
        """What would otherwise fail later: the default model at the first turn, TLS files at bind."""
        config = self.config
        if config.model:
            try:
                provider, _ = create_provider(config.model)
                if parse_model(config.model).provider == "scripted":
                    # Providers load scripts lazily: the operator's own must load now, or say why.
                    await ScriptLibrary(()).load_async(parse_model(config.model).name, check=False)
            except ValueError as exc:  # a malformed model string, an unknown provider, a bad script
                raise ServerConfigError(f"default model: {exc}") from None
            await provider.aclose()
        _check_tls_files(config)
        _check_local_query_tools(config, self.registry)

    def _start_local_workers(self) -> None:
        for i in range(self.config.local_workers):
            worker_id = f"local-{i + 1}"
            self._local[worker_id] = None
            self._supervisors.append(
                asyncio.create_task(self._keep_local_worker(worker_id), name=f"local-worker-{worker_id}")
            )

    def _local_worker_argv(self, worker_id: str) -> list[str]:
        argv = [
            sys.executable, "-m", "tool_worker",
            "--connect", self.local_hub_address,
            "--id", worker_id,
            "--slots", str(self.config.local_worker_slots),
            "--parent-pid", str(os.getpid()),
            "--log-level", self.config.local_worker_log_level,
            "--log-format", self.config.log_format,
        ]  # fmt: skip
        for module in self.config.local_worker_tools:
            argv += ["--tools", module]
        if self.config.otlp_endpoint:
            argv += ["--otlp-endpoint", self.config.otlp_endpoint]
        if self.config.allow_unsandboxed:
            argv.append("--allow-unsandboxed")
        return argv

    async def _keep_local_worker(self, worker_id: str) -> None:
        """Runs one local worker for as long as the server runs: a worker that exits (drained,
        crashed, killed) is reaped and replaced by a new process with the same id."""
        env = dict(os.environ)
        env["CODELANE_WORKER_TOKEN"] = self._local_token
        loop = asyncio.get_running_loop()
        delay = LOCAL_WORKER_RESTART_DELAY
        while not self._stopping:
            try:
                proc = await asyncio.create_subprocess_exec(*self._local_worker_argv(worker_id), env=env)
            except OSError as exc:
                log.error("cannot start local worker %s: %s", worker_id, exc,
                          extra=log_context.ids(worker_id=worker_id))
                return
            self._local[worker_id] = proc
            if self._stopping:  # stop() began while the process was starting: it saw no process
                proc.terminate()
            started = loop.time()
            code = await proc.wait()
            self._local[worker_id] = None
            if self._stopping:
                return
            if code in (EXIT_UNAUTHENTICATED, EXIT_REJECTED):
                log.error("local worker %s was refused by this server (exit %d): not replacing it", worker_id, code,
                          extra=log_context.ids(worker_id=worker_id))
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            if loop.time() - started >= LOCAL_WORKER_HEALTHY:
                delay = LOCAL_WORKER_RESTART_DELAY
                log.info("local worker %s %s; starting a new one", worker_id, how,
                         extra=log_context.ids(worker_id=worker_id))
                continue
            # Exit 0 is a drain (an operator's `codelane drain`): no fault to warn of, though a
            # quick one still waits, lest a worker that exits at once be restarted in a loop.
            log.log(logging.INFO if code == 0 else logging.WARNING, "local worker %s %s; starting a new one in %.1fs",
                    worker_id, how, delay, extra=log_context.ids(worker_id=worker_id))
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCAL_WORKER_RESTART_MAX)

    def local_worker_pids(self) -> dict[str, int]:
        """The process id of each local worker running now."""
        return {worker_id: proc.pid for worker_id, proc in self._local.items() if proc is not None}

    async def stop(self, grace: float = 5.0, hurry: asyncio.Event | None = None) -> None:
        """Graceful, shutdown first: health goes NOT_SERVING and nothing new is admitted (new
        sessions, turns and event streams are refused with UNAVAILABLE, while calls on running work
        are still served); running turns get `grace` seconds to finish, the rest are interrupted
        (marked so, and their streams close); the event streams that follow and the claims that
        wait end (ShuttingDown); then the workers are stopped and the store closed. Setting `hurry`
        (an operator's second signal) ends the grace at once, for the turns and the local workers."""
        self._stopping = True
        if self.admission is not None:
            self.admission.close()
        self.readiness.set("draining", False, "the server is stopping")
        await self._health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        if self.sessions is not None:
            await self.sessions.shutdown(grace, hurry)
        workers = [proc for proc in self._local.values() if proc is not None]
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        # Before the gRPC servers stop: their stop cancels the streams still open, so a worker
        # would hear "Cancelling all calls" instead of SHUTTING_DOWN (worker.proto, Connect).
        await self.pool.close()
        # RPC_STOP_GRACE whatever the turns' grace was: the interrupted turns' streams still have
        # their last events (TurnFinished) to write, and a grace of 0 cut them before, under load,
        # with a bare "Cancelling all calls". The stop ends as soon as nothing is open.
        if self._server is not None:
            await self._server.stop(RPC_STOP_GRACE)
        if self._local_hub is not None:
            await self._local_hub.stop(RPC_STOP_GRACE)
        self.snapshots.close()
        if self.external_cas is not None:
            await self.external_cas.close()
        for proc in workers:
            try:
                await asyncio.wait_for(proc.wait(), 0 if hurry is not None and hurry.is_set() else grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for supervisor in self._supervisors:
            supervisor.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors.clear()
        self._local.clear()
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.stop()
            self._metrics_endpoint = None
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None
        if self.telemetry.tracing is not None:
            # Sends the spans still buffered; bounded by the exporter's timeout, off the loop.
            tracing, self.telemetry = self.telemetry.tracing, Telemetry(self.metrics)
            await asyncio.to_thread(tracing.shutdown)
        if self.store is not None:
            self.store.close()
            self.store = None
        await self.sandbox.aclose()
        if self._data_dir_lock is not None:
            os.close(self._data_dir_lock)  # the next server on this data directory may start
            self._data_dir_lock = None

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _readiness_changed(self, serving: bool) -> None:
        if self._health_names:
            self._keep(asyncio.get_running_loop().create_task(self._set_health(serving)))

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_names:
            await self._health.set(name, status)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class _ServerState:
    """What the metrics' StateCollector reads of a started server."""

    def __init__(self, server: CodelaneServer) -> None:
        self._server = server

    def worker_snapshots(self):
        return self._server.pool.workers()

    def backlog(self) -> list[BacklogEntry]:
        # The unlabelled series is always there: an autoscaler reads 0, not "no data", when idle.
        waiting: dict[str, tuple[int, float]] = {"": (0, 0.0)}
        for labels, age in self._server.pool.waiting():
            key = label_set(labels)
            count, oldest = waiting.get(key, (0, 0.0))
            waiting[key] = (count + 1, max(oldest, age))
        return [BacklogEntry("query", key, count, oldest) for key, (count, oldest) in sorted(waiting.items())]

    def subscribers(self) -> int:
        sessions = self._server.sessions
        return sessions.bus.subscribers() if sessions is not None else 0

    def external_tasks(self) -> dict[str, int]:
        sessions = self._server.sessions
        return sessions.external.counts() if sessions is not None else {}

    def running_turns(self) -> int:
        sessions = self._server.sessions
        return sessions.running_turns() if sessions is not None else 0

    def admission(self) -> dict[str, tuple[int, int]]:
        admission = self._server.admission
        usage = admission.usage() if admission is not None else {}
        # A limit of the pool's (a worker's Hello), not of work admitted: the same series, so that
        # workers refused at it show.
        return {**usage, "max_tools": self._server.pool.tool_usage()}

    def serving(self) -> dict[str, bool]:
        return self._server.readiness.conditions()
