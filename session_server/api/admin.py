"""AdminService: the worker pool and the lanes' queues."""

from __future__ import annotations

import grpc

from codelane import __version__
from codelane.v1 import admin_pb2, admin_pb2_grpc, tools_pb2
from session_server.api.convert import timestamp, worker_info
from session_server.api.errors import abort
from session_server.pool import WorkerPool
from session_server.stats import LaneStats
from tool_worker import wire

LANE_PROTOS = {"query": tools_pb2.LANE_QUERY, "execute": tools_pb2.LANE_EXECUTE, "generate": tools_pb2.LANE_GENERATE}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, pool: WorkerPool, stats: LaneStats, started: float) -> None:
        """`started`: when the server started serving (epoch seconds)."""
        self._pool = pool
        self._stats = stats
        self._started = started

    async def ListWorkers(self, request, context):
        return admin_pb2.ListWorkersResponse(workers=[worker_info(w) for w in self._pool.workers()])

    async def DrainWorker(self, request, context):
        if not request.worker_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "worker_id is empty", "INVALID_ARGUMENT",
                        field="worker_id")
        try:
            snapshot = self._pool.drain(request.worker_id, request.reason or "drain requested by an operator")
        except KeyError:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no worker {request.worker_id!r} is connected",
                        "WORKER_NOT_FOUND", worker_id=request.worker_id)
        return admin_pb2.DrainWorkerResponse(worker=worker_info(snapshot))

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
