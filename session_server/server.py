"""Assembles the session server: gRPC services, worker pool, local workers; starts and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from codelane.transport import SERVER_OPTIONS
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, worker_pb2, worker_pb2_grpc
from session_server.api.admin import AdminServicer
from session_server.api.auth import BearerTokenInterceptor
from session_server.api.hub import WorkerHubServicer
from session_server.api.sessions import SessionServicer
from session_server.bus import SUBSCRIBER_BUFFER
from session_server.llm.factory import create_provider
from session_server.pool import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_NO_WORKER_WAIT,
    WorkerPool,
)
from session_server.sessions import DEFAULT_GENERATE_LIMIT, SessionManager
from session_server.stats import LaneStats
from session_server.store import Store
from tool_worker.fingerprint import workspace_fingerprint
from tool_worker.registry import ToolRegistry
from tool_worker.worker import EXIT_REJECTED, EXIT_UNAUTHENTICATED

log = logging.getLogger("codelane.server")

LOCAL_WORKER_SLOTS = 4
# A local worker that exits is replaced. One that lived at least LOCAL_WORKER_HEALTHY seconds is
# replaced at once; one that died younger waits LOCAL_WORKER_RESTART_DELAY, doubled per early
# death up to LOCAL_WORKER_RESTART_MAX, so a worker that cannot start does not spin.
LOCAL_WORKER_HEALTHY = 10.0
LOCAL_WORKER_RESTART_DELAY = 0.5
LOCAL_WORKER_RESTART_MAX = 30.0


class ServerConfigError(ValueError):
    """The server cannot start with this configuration (a model, a file, an address); the message
    says which and why."""


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
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    no_worker_wait: float = DEFAULT_NO_WORKER_WAIT
    subscriber_buffer: int = SUBSCRIBER_BUFFER
    max_llm_requests: int = DEFAULT_GENERATE_LIMIT
    local_worker_log_level: str = "WARNING"


def _check_tls_files(config: ServerConfig) -> None:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ServerConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    for what, path in (("TLS certificate", config.tls_cert), ("TLS key", config.tls_key),
                       ("TLS client CA", config.tls_ca)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ServerConfigError(f"{what} {path}: not a readable file")


class CodelaneServer:
    """One session server. `await start()` binds and returns the port; `await stop()` drains."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.pool = WorkerPool(
            workspace_fingerprint,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            no_worker_wait=config.no_worker_wait,
        )
        self.stats = LaneStats()
        self.registry = ToolRegistry.builtin()
        for module in config.local_worker_tools:
            self.registry.load_module(module)
        self.store: Store | None = None
        self.sessions: SessionManager | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        # Local workers by id: the process now running (None between two), and its supervisor.
        self._local: dict[str, asyncio.subprocess.Process | None] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Binds, serves and starts the local workers; returns the port. ServerConfigError when
        the configuration cannot work (checked before anything is served)."""
        await self._check_config()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.config.data_dir / "codelane.db")
        self.sessions = SessionManager(
            self.store, self.pool, self.registry, self.stats,
            default_model=self.config.model, local_fallback=self.config.local_fallback,
            subscriber_buffer=self.config.subscriber_buffer,
            generate_limit=self.config.max_llm_requests,
        )
        self.sessions.recover()
        self.pool.start()
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(self.config.token, self.config.worker_token)],
            options=SERVER_OPTIONS,
        )
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(WorkerHubServicer(self.pool), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.pool, self.stats, time.time()), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        try:
            if self.config.tls_cert and self.config.tls_key:
                self.port = server.add_secure_port(self.config.listen, self._server_credentials())
            else:
                self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError:  # gRPC's "Failed to bind": in use, or not an address of this host
            self.port = 0
        if self.port == 0:
            tls = ", or the TLS certificate and key do not load" if self.config.tls_cert else ""
            raise OSError(f"cannot listen on {self.config.listen}: the port is taken, or the host is not one of "
                          f"this machine's addresses{tls}")
        await server.start()
        self._server = server
        for name in [*names[:3], ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._start_local_workers()
        return self.port

    async def _check_config(self) -> None:
        """What would otherwise fail later: the default model at the first turn, TLS files at bind."""
        config = self.config
        if config.model:
            try:
                provider, _ = create_provider(config.model)
            except ValueError as exc:  # a malformed model string, an unknown provider, a bad script
                raise ServerConfigError(f"default model: {exc}") from None
            await provider.aclose()
        _check_tls_files(config)

    def _server_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        return grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            require_client_auth=bool(config.tls_ca),
        )

    def _start_local_workers(self) -> None:
        for i in range(self.config.local_workers):
            worker_id = f"local-{i + 1}"
            self._local[worker_id] = None
            self._supervisors.append(
                asyncio.create_task(self._keep_local_worker(worker_id), name=f"local-worker-{worker_id}")
            )

    def _local_worker_argv(self, worker_id: str) -> list[str]:
        # Local workers always dial loopback, whatever address the server listens on.
        argv = [
            sys.executable, "-m", "tool_worker",
            "--connect", f"127.0.0.1:{self.port}",
            "--id", worker_id,
            "--slots", str(self.config.local_worker_slots),
            "--parent-pid", str(os.getpid()),
            "--log-level", self.config.local_worker_log_level,
        ]  # fmt: skip
        for module in self.config.local_worker_tools:
            argv += ["--tools", module]
        return argv

    async def _keep_local_worker(self, worker_id: str) -> None:
        """Runs one local worker for as long as the server runs: a worker that exits (drained,
        crashed, killed) is reaped and replaced by a new process with the same id."""
        env = dict(os.environ)
        if self.config.worker_token:
            env["CODELANE_WORKER_TOKEN"] = self.config.worker_token
        loop = asyncio.get_running_loop()
        delay = LOCAL_WORKER_RESTART_DELAY
        while not self._stopping:
            try:
                proc = await asyncio.create_subprocess_exec(*self._local_worker_argv(worker_id), env=env)
            except OSError as exc:
                log.error("cannot start local worker %s: %s", worker_id, exc)
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
                log.error("local worker %s was refused by this server (exit %d): not replacing it", worker_id, code)
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            if loop.time() - started >= LOCAL_WORKER_HEALTHY:
                delay = LOCAL_WORKER_RESTART_DELAY
                log.info("local worker %s %s; starting a new one", worker_id, how)
                continue
            log.warning("local worker %s %s; starting a new one in %.1fs", worker_id, how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCAL_WORKER_RESTART_MAX)

    def local_worker_pids(self) -> dict[str, int]:
        """The process id of each local worker running now."""
        return {worker_id: proc.pid for worker_id, proc in self._local.items() if proc is not None}

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: running turns end (marked interrupted, so their streams close), calls get
        `grace` seconds to finish, then the workers are stopped and the store closed."""
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        if self.sessions is not None:
            await self.sessions.shutdown()
        workers = [proc for proc in self._local.values() if proc is not None]
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        if self._server is not None:
            await self._server.stop(grace)
        await self.pool.close()
        for proc in workers:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for supervisor in self._supervisors:
            supervisor.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors.clear()
        self._local.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
