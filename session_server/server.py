"""Assembles the session server: gRPC services, worker pool, local workers; starts and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from codelane.reapi import bytestream_pb2_grpc, remote_execution_pb2_grpc
from codelane.transport import SERVER_OPTIONS
from codelane.v1 import admin_pb2, admin_pb2_grpc, session_pb2, session_pb2_grpc, worker_pb2, worker_pb2_grpc
from session_server.api.admin import AdminServicer
from session_server.api.auth import BearerTokenInterceptor
from session_server.api.content import (
    BYTESTREAM_SERVICE,
    CAS_SERVICE,
    ByteStreamServicer,
    ContentAddressableStorageServicer,
)
from session_server.api.hub import WorkerHubServicer
from session_server.api.sessions import SessionServicer
from session_server.bus import SUBSCRIBER_BUFFER
from session_server.content import ContentStore
from session_server.external_cas import ExternalCas
from session_server.pool import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_NO_WORKER_WAIT,
    WorkerPool,
)
from session_server.sessions import DEFAULT_GENERATE_LIMIT, SessionManager
from session_server.snapshots import SnapshotRegistry
from session_server.stats import LaneStats
from session_server.store import Store
from tool_worker.merkle import DEFAULT_EXCLUDES
from tool_worker.registry import ToolRegistry

log = logging.getLogger("codelane.server")

LOCAL_WORKER_SLOTS = 4


class UnsafeConfig(ValueError):
    """The server would run with a door open; the message says which flag closes it."""


def is_loopback(listen: str) -> bool:
    """Whether a listen address only accepts connections from this host."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self.external_cas = ExternalCas(config.cas, config.cas_instance) if config.cas else None
        self.snapshots = SnapshotRegistry(
            config.snapshot_excludes, publish=self.external_cas.publish if self.external_cas else None
        )
        self.content = ContentStore(self.snapshots)
        self.pool = WorkerPool(
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
        self.ports: list[int] = []
        self._server: grpc.aio.Server | None = None
        # Local workers dial a hub of their own on an abstract unix socket: reachable from this
        # host only, it serves nothing but the hub (so it never bypasses the clients' TLS or
        # mTLS), and it wants a token only this process knows.
        self._local_hub: grpc.aio.Server | None = None
        self.local_hub_address = ""
        self._local_token = config.worker_token or secrets.token_urlsafe(32)
        self._health = health.aio.HealthServicer()
        self._workers: list[subprocess.Popen[bytes]] = []

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
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.config.data_dir / "codelane.db")
        self.sessions = SessionManager(
            self.store, self.pool, self.registry, self.stats,
            default_model=self.config.model, local_fallback=self.config.local_fallback,
            subscriber_buffer=self.config.subscriber_buffer,
            generate_limit=self.config.max_llm_requests,
            snapshots=self.snapshots,
        )
        self.sessions.recover()
        self.pool.start()
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(self.config.token, hub_token)],
            options=SERVER_OPTIONS,
        )
        hub = WorkerHubServicer(self.pool, self._content_source())
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, server)
        if self.external_cas is None:
            self._add_content_services(server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.pool, self.stats), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            *([] if self.external_cas else [CAS_SERVICE, BYTESTREAM_SERVICE]),
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        for address in [self.config.listen, *self.config.extra_listen]:
            if self.config.tls_cert and self.config.tls_key:
                port = server.add_secure_port(address, self._server_credentials())
            else:
                port = server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            self.ports.append(port)
        self.port = self.ports[0]
        if self.external_cas is not None:
            await self.external_cas.connect()
        await server.start()
        self._server = server
        if self.config.local_workers > 0:
            await self._start_local_hub(hub)
        for name in [*names[: len(names) - 2], ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._spawn_local_workers()
        log.info("codelane server listening on %s", self.address)
        return self.port

    def _content_source(self) -> worker_pb2.ContentSource:
        source = worker_pb2.ContentSource(exclude=self.snapshots.excludes, max_batch_bytes=self.content.max_batch_bytes)
        if self.external_cas is not None:
            source.address, source.instance_name = self.config.cas, self.config.cas_instance
        return source

    def _add_content_services(self, server: grpc.aio.Server) -> None:
        remote_execution_pb2_grpc.add_ContentAddressableStorageServicer_to_server(
            ContentAddressableStorageServicer(self.content), server
        )
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(ByteStreamServicer(self.content), server)

    def _server_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        return grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
            root_certificates=Path(config.tls_ca).read_bytes() if config.tls_ca else None,
            require_client_auth=bool(config.tls_ca),
        )

    async def _start_local_hub(self, hub: WorkerHubServicer) -> None:
        local = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(None, self._local_token)], options=SERVER_OPTIONS
        )
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, local)
        if self.external_cas is None:
            self._add_content_services(local)
        self.local_hub_address = f"unix-abstract:codelane-hub-{os.getpid()}-{secrets.token_hex(8)}"
        if local.add_insecure_port(self.local_hub_address) == 0:
            raise OSError(f"cannot listen on {self.local_hub_address} for the local workers")
        await local.start()
        self._local_hub = local

    def _spawn_local_workers(self) -> None:
        if self.config.local_workers <= 0:
            return
        target = self.local_hub_address
        env = dict(os.environ)
        env["CODELANE_WORKER_TOKEN"] = self._local_token
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
        if self._local_hub is not None:
            await self._local_hub.stop(grace)
        await self.pool.close()
        self.snapshots.close()
        if self.external_cas is not None:
            await self.external_cas.close()
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

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
