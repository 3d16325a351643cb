"""AdminService: the worker pool and the lanes' queues."""

from __future__ import annotations

import grpc

from codelane import __version__
from codelane.v1 import admin_pb2, admin_pb2_grpc, tools_pb2
from session_server.api.convert import MAX_PAGE_BYTES, field_bytes, page_within, timestamp, worker_info
from session_server.api.errors import abort
from session_server.paging import decode_page_token, encode_page_token
from session_server.pool import WorkerPool, WorkerSnapshot
from session_server.stats import LaneStats
from tool_worker import wire

LANE_PROTOS = {"query": tools_pb2.LANE_QUERY, "execute": tools_pb2.LANE_EXECUTE, "generate": tools_pb2.LANE_GENERATE}
# Workers in a ListWorkers page, the byte bound aside. A request without page_size gets the most:
# a client written before pages existed still sees every worker of a pool that fits in one.
MAX_WORKERS_PAGE = 1000
# What a worker's entry adds to its response besides its own encoding: its tag and length.
_ENTRY_FRAMING = field_bytes(MAX_PAGE_BYTES) - MAX_PAGE_BYTES


def _fitted(snapshot: WorkerSnapshot) -> admin_pb2.WorkerInfo:
    """The worker's entry, cut to fit alone in a page that ends with it, next_page_token included
    (a worker holding hundreds of workspaces with long paths would pass it: its last are left out)."""
    reserved = _ENTRY_FRAMING + field_bytes(len(encode_page_token(snapshot.worker_id)))
    return worker_info(snapshot, MAX_PAGE_BYTES - reserved)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, pool: WorkerPool, stats: LaneStats, started: float) -> None:
        """`started`: when the server started serving (epoch seconds)."""
        self._pool = pool
        self._stats = stats
        self._started = started

    async def ListWorkers(self, request, context):
        if not 0 <= request.page_size <= MAX_WORKERS_PAGE:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"page_size {request.page_size} is out of range [0, {MAX_WORKERS_PAGE}]", "INVALID_ARGUMENT",
                        field="page_size")
        after = ""
        if request.page_token:
            try:
                [after] = decode_page_token(request.page_token, "ListWorkers", str)
            except ValueError as exc:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT",
                            field="page_token")
        size = request.page_size or MAX_WORKERS_PAGE
        # One more than the page tells whether another page follows.
        snapshots = self._pool.workers(after=after, limit=size + 1)
        workers, cut = page_within((_fitted(s) for s in snapshots[:size]),
                                   lambda info: field_bytes(len(encode_page_token(info.worker_id))))
        more = cut or len(snapshots) > size
        return admin_pb2.ListWorkersResponse(workers=workers,
                                             next_page_token=encode_page_token(workers[-1].worker_id) if more else "")

    async def DrainWorker(self, request, context):
        if not request.worker_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "worker_id is empty", "INVALID_ARGUMENT",
                        field="worker_id")
        try:
            snapshot = self._pool.drain(request.worker_id, request.reason or "drain requested by an operator")
        except KeyError:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no worker {request.worker_id!r} is connected",
                        "WORKER_NOT_FOUND", worker_id=request.worker_id)
        return admin_pb2.DrainWorkerResponse(worker=_fitted(snapshot))

    async def GetServerInfo(self, request, context):
        return admin_pb2.GetServerInfoResponse(version=__version__, start_time=timestamp(self._started))

    async def GetQueueStats(self, request, context):
        slots, in_flight = self._pool.capacity()
        lanes = []
        for lane, snap in self._stats.snapshot().items():
            lanes.append(
                admin_pb2.LaneStats(
                    lane=LANE_PROTOS[str(lane)],
                    pending=snap.pending,
                    active=snap.active,
                    completed=snap.completed,
                    failed=snap.failed,
                    latency_p50=wire.duration(snap.p50),
                    latency_p90=wire.duration(snap.p90),
                    latency_p99=wire.duration(snap.p99),
                )
            )
        return admin_pb2.GetQueueStatsResponse(
            lanes=lanes, workers=len(self._pool.workers()), worker_slots=slots, worker_in_flight=in_flight
        )
