"""Assembles the session server: gRPC services, worker pool, local workers; starts and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import subprocess
import sys
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
from session_server.pool import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_NO_WORKER_WAIT,
    WorkerPool,
)
from session_server.sessions import DEFAULT_GENERATE_LIMIT, SessionManager
from session_server.stats import LaneStats
from session_server.store import Store
from tool_worker.confinement.launcher import Sandbox
from tool_worker.confinement.policy import DEFAULT_PROTECTED, ResourceLimits, SandboxMode, SandboxSettings
from tool_worker.fingerprint import workspace_fingerprint
from tool_worker.registry import ToolRegistry

log = logging.getLogger("codelane.server")

LOCAL_WORKER_SLOTS = 4


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
    # The sandbox of bash and execute (README "Sandbox"): sessions' default mode, whether they may
    # turn it off or use the network, their limits, and what no command may read or change.
    sandbox: SandboxMode = SandboxMode.WORKSPACE_WRITE
    allow_unsandboxed: bool = False
    sandbox_allow_network: bool = False
    sandbox_limits: ResourceLimits = field(default_factory=ResourceLimits)
    sandbox_deny_read: list[Path] = field(default_factory=list)
    sandbox_protect: list[str] = field(default_factory=list)

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
        self.sandbox = Sandbox(config.sandbox_settings(), keep_warm=True)
        self.registry = ToolRegistry.builtin(self.sandbox)
        for module in config.local_worker_tools:
            self.registry.load_module(module)
        self.store: Store | None = None
        self.sessions: SessionManager | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._workers: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        # Before anything runs: end what a crash of this server left, and learn what the host enforces.
        await asyncio.to_thread(self.sandbox.start)
        log.info("%s", self.sandbox.describe())
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
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.pool, self.stats), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        if self.config.tls_cert and self.config.tls_key:
            self.port = server.add_secure_port(self.config.listen, self._server_credentials())
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server = server
        for name in [*names[:3], ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._spawn_local_workers()
        log.info("codelane server listening on %s", self.address)
        return self.port

    def _server_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        return grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            require_client_auth=bool(config.tls_ca),
        )

    def _spawn_local_workers(self) -> None:
        if self.config.local_workers <= 0:
            return
        # Local workers always dial loopback, whatever address the server listens on.
        target = f"127.0.0.1:{self.port}"
        env = dict(os.environ)
        if self.config.worker_token:
            env["CODELANE_WORKER_TOKEN"] = self.config.worker_token
        for i in range(self.config.local_workers):
            argv = [
                sys.executable,
                "-m",
                "tool_worker",
                "--connect",
                target,
                "--id",
                f"local-{i + 1}",
                "--slots",
                str(self.config.local_worker_slots),
                "--parent-pid",
                str(os.getpid()),
            ]
            for module in self.config.local_worker_tools:
                argv += ["--tools", module]
            if self.config.allow_unsandboxed:
                argv.append("--allow-unsandboxed")
            self._workers.append(subprocess.Popen(argv, env=env))

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: running turns end (marked interrupted, so their streams close), calls get
        `grace` seconds to finish, then the workers are stopped and the store closed."""
        await self._health.enter_graceful_shutdown()
        if self.sessions is not None:
            await self.sessions.shutdown()
        for proc in self._workers:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        if self._server is not None:
            await self._server.stop(grace)
        await self.pool.close()
        for proc in self._workers:
            try:
                await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._workers.clear()
        if self.store is not None:
            self.store.close()
            self.store = None
        await self.sandbox.aclose()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
