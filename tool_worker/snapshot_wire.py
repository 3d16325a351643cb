"""Snapshots and holdings <-> their protos (codelane.v1.WorkspaceSnapshot, WorkspaceHolding).
Shared by the worker and the hub."""

from __future__ import annotations

from codelane.reapi import remote_execution_pb2
from codelane.v1 import worker_pb2, workspace_pb2
from tool_worker.merkle import SHARED, SYNCED, SYNCING, UNAVAILABLE, Digest, Holding, SnapshotRef, valid_hash

MODE_TO_PROTO = {
    SHARED: workspace_pb2.WORKSPACE_MODE_SHARED,
    SYNCED: workspace_pb2.WORKSPACE_MODE_SYNCED,
    SYNCING: workspace_pb2.WORKSPACE_MODE_SYNCING,
    UNAVAILABLE: workspace_pb2.WORKSPACE_MODE_UNAVAILABLE,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}


def set_digest(msg: remote_execution_pb2.Digest, digest: Digest) -> None:
    msg.hash = digest.hash
    msg.size_bytes = digest.size


def digest_from_proto(msg: remote_execution_pb2.Digest) -> Digest | None:
    """None for an unset or malformed digest."""
    if not valid_hash(msg.hash) or msg.size_bytes < 0:
        return None
    return Digest(msg.hash, msg.size_bytes)


def set_snapshot(msg: workspace_pb2.WorkspaceSnapshot, snapshot: SnapshotRef) -> None:
    msg.workspace = snapshot.workspace
    set_digest(msg.root_digest, snapshot.digest)
    set_digest(msg.times_digest, snapshot.times_digest)
    msg.exclude.extend(snapshot.exclude)


# Bounds of WorkspaceSnapshot.exclude (workspace.proto): one pattern per path of the operator's
# deny list, which no operator makes longer.
MAX_WORKSPACE_EXCLUDES = 1024
MAX_EXCLUDE_BYTES = 4096


def snapshot_from_proto(msg: workspace_pb2.WorkspaceSnapshot) -> SnapshotRef | None:
    """None when the message names no valid snapshot (its exclusions past their bounds included)."""
    digest, times = digest_from_proto(msg.root_digest), digest_from_proto(msg.times_digest)
    if not msg.workspace or digest is None or times is None:
        return None
    exclude = tuple(msg.exclude)
    if len(exclude) > MAX_WORKSPACE_EXCLUDES or any(len(p.encode()) > MAX_EXCLUDE_BYTES for p in exclude):
        return None
    return SnapshotRef(msg.workspace, digest, times, exclude)


def holding_to_proto(holding: Holding) -> worker_pb2.WorkspaceHolding:
    msg = worker_pb2.WorkspaceHolding(workspace=holding.workspace, mode=MODE_TO_PROTO[holding.mode],
                                      reason=holding.reason)
    if holding.digest is not None:
        set_digest(msg.root_digest, holding.digest)
    return msg


# A holding is kept for the worker's life and shown by ListWorkers: three of 25 MB made every
# ListWorkers fail. No workspace path is longer (the server refuses longer ones).
MAX_WORKSPACE_CHARS = 4096
MAX_REASON_CHARS = 1024


def holding_from_proto(msg: worker_pb2.WorkspaceHolding) -> Holding | None:
    """None for an entry without a workspace, with a workspace path longer than any the server
    has, or with an unknown mode (a newer worker's). A long reason is cut."""
    mode = MODE_FROM_PROTO.get(msg.mode)
    if not msg.workspace or len(msg.workspace) > MAX_WORKSPACE_CHARS or mode is None:
        return None
    return Holding(msg.workspace, mode, digest_from_proto(msg.root_digest), msg.reason[:MAX_REASON_CHARS])
