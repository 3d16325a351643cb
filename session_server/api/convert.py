"""Domain objects -> codelane.v1 protos for the admin API (the session API adds its own here)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from codelane.v1 import admin_pb2
from session_server.pool import WorkerSnapshot


def timestamp(epoch_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(epoch_seconds * 1e9))
    return ts


def worker_info(snapshot: WorkerSnapshot) -> admin_pb2.WorkerInfo:
    return admin_pb2.WorkerInfo(
        worker_id=snapshot.worker_id,
        version=snapshot.version,
        labels=snapshot.labels,
        tools=snapshot.tools,
        slots=snapshot.slots,
        in_flight=snapshot.in_flight,
        workspace_roots=snapshot.workspace_roots,
        state=admin_pb2.WORKER_STATE_DRAINING if snapshot.draining else admin_pb2.WORKER_STATE_READY,
        connect_time=timestamp(snapshot.connected_at),
        last_heartbeat_time=timestamp(snapshot.last_seen),
        workspaces=[
            admin_pb2.WorkspaceVisibility(workspace=ws, visible=visible, reason=reason)
            for ws, (visible, reason) in snapshot.workspaces.items()
        ],
        completed_calls=snapshot.completed,
        hostname=snapshot.hostname,
        peer=snapshot.peer,
    )
