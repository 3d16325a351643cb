"""The conformance kit's hub: the server's own worker hub, pool and content service (the REAPI
CAS and ByteStream workers fetch snapshots from), on 127.0.0.1, remembering what the worker did
(heartbeats, departures, results nobody asked for, what it holds) so checks can judge it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from codelane.transport import SERVER_OPTIONS
from codelane.v1 import worker_pb2, worker_pb2_grpc
from session_server.api.auth import BearerTokenInterceptor
from session_server.api.content import add_content_services
from session_server.api.hub import WorkerHubServicer
from session_server.content import ContentStore
from session_server.pool import WorkerLink, WorkerPool, WorkerRegistration
from session_server.snapshots import SnapshotRegistry
from tool_worker.merkle import Holding
from tool_worker.tools.base import ToolResult

# The kit's timing, sent in Welcome. Shorter than the server's defaults (2 s, 6 s) on purpose: a
# worker that ignores Welcome and keeps its own interval is caught.
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
NO_WORKER_WAIT = 1.0


@dataclass
class Departure:
    worker_id: str
    reason: str
    # "drained", "closed", "stream_broken", "heartbeat_timeout", "replaced", ...
    cause: str


@dataclass
class Record:
    """What the hub saw, kept across hub restarts. `changed` is set on every new entry."""

    heartbeats: dict[str, list[float]] = field(default_factory=dict)
    departures: list[Departure] = field(default_factory=list)
    draining: set[str] = field(default_factory=set)
    # (worker id, dispatch id) of results for calls the worker was never given (or no longer has).
    stray_results: list[tuple[str, str]] = field(default_factory=list)
    registrations: list[WorkerRegistration] = field(default_factory=list)
    # Every Holdings report, in order: (worker id, holding).
    holdings: list[tuple[str, Holding]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self) -> None:
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], within: float) -> bool:
        """Waits until `predicate()` holds, re-checking whenever the hub records something (and at
        least every 0.1 s, for the pool's own state); False if `within` seconds pass first."""
        deadline = time.monotonic() + within
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass
        return True


class RecordingPool(WorkerPool):
    """The server's WorkerPool, noting each worker message it is fed into a Record."""

    def __init__(self, record: Record) -> None:
        super().__init__(heartbeat_interval=HEARTBEAT_INTERVAL, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                         no_worker_wait=NO_WORKER_WAIT)
        self.record = record

    def register(self, reg: WorkerRegistration, link: WorkerLink) -> str:
        token = super().register(reg, link)
        self.record.registrations.append(reg)
        self.record.note()
        return token

    def unregister(self, worker_id: str, link: WorkerLink, reason: str, cause: str = "disconnected") -> None:
        if self._live(worker_id, link) is not None:
            self.record.departures.append(Departure(worker_id, reason, cause))
        super().unregister(worker_id, link, reason, cause)
        self.record.note()

    def heartbeat(self, worker_id: str, link: WorkerLink) -> None:
        if self._live(worker_id, link) is not None:
            self.record.heartbeats.setdefault(worker_id, []).append(time.monotonic())
        super().heartbeat(worker_id, link)
        self.record.note()

    def on_holdings(self, worker_id: str, link: WorkerLink, holdings: list[Holding]) -> None:
        if self._live(worker_id, link) is not None:
            self.record.holdings.extend((worker_id, holding) for holding in holdings)
        super().on_holdings(worker_id, link, holdings)
        self.record.note()

    def worker_draining(self, worker_id: str, link: WorkerLink) -> None:
        self.record.draining.add(worker_id)
        super().worker_draining(worker_id, link)
        self.record.note()

    def on_result(self, worker_id: str, link: WorkerLink, dispatch_id: str, result: ToolResult) -> None:
        if self.in_flight_ids(worker_id).isdisjoint({dispatch_id}):
            self.record.stray_results.append((worker_id, dispatch_id))
        super().on_result(worker_id, link, dispatch_id, result)
        self.record.note()

    def _lose(self, worker, reason: str, cause: str) -> None:
        # Heartbeat timeouts are noticed here, by the pool's monitor, not through unregister().
        if cause == "heartbeat_timeout":
            self.record.departures.append(Departure(worker.id, reason, cause))
            self.record.note()
        super()._lose(worker, reason, cause)

    def in_flight_ids(self, worker_id: str) -> set[str]:
        worker = self._workers.get(worker_id)
        return set(worker.in_flight) if worker is not None else set()


# A path inside the sample workspace that no snapshot holds (see ConformanceHub.snapshots).
EXCLUDED_PATH = "conformance-excluded"


class ConformanceHub:
    """A real hub (WorkerHubService with bearer-token auth) on 127.0.0.1; `restart()` stops it and
    starts a new one on the same port, as a redeployed server would."""

    def __init__(self, token: str, record: Record) -> None:
        self.token = token
        self.record = record
        self.port = 0
        self.pool: RecordingPool | None = None
        # Snapshots outlive a hub restart, as a server's workspaces do on disk. Every snapshot
        # carries a workspace exclusion (WorkspaceSnapshot.exclude), as a server's do where its
        # deny list lies inside a workspace: a worker must take the field, and one on the hub's
        # filesystem must apply it to prove it shares the workspace.
        self.snapshots = SnapshotRegistry(workspace_excludes=lambda workspace: (EXCLUDED_PATH,))
        self.content = ContentStore(self.snapshots)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        pool = RecordingPool(self.record)
        server = grpc.aio.server(interceptors=[BearerTokenInterceptor(None, self.token)], options=SERVER_OPTIONS)
        source = worker_pb2.ContentSource(exclude=self.snapshots.excludes, max_batch_bytes=self.content.max_batch_bytes)
        worker_pb2_grpc.add_WorkerHubServiceServicer_to_server(WorkerHubServicer(pool, source), server)
        add_content_services(server, self.content)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{self.port}")
        await server.start()
        pool.start()
        self.port, self.pool, self._server = port, pool, server

    async def stop(self) -> None:
        if self._server is not None:
            await self.pool.close()
            await self._server.stop(grace=0.5)
            self._server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()
