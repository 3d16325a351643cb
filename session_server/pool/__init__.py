"""The worker pool: places Query calls on connected tool workers (see `pool.WorkerPool`).

Split by concern: `workers` (who is connected, their credit, who owns an id), `routing`
(capability, and a preference for workers holding a call's snapshot), `fairness` (round-robin across sessions), `pool`
(dispatch, deadlines, retries, liveness). Writing to a worker's stream is the hub's business
(`session_server.api.hub`), behind `types.WorkerLink`.
"""

from session_server.pool.pool import WorkerPool
from session_server.pool.types import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_TOOLS,
    DEFAULT_NO_WORKER_WAIT,
    Assignment,
    InvalidRegistration,
    LinkFault,
    PlacementObserver,
    PoolClosed,
    QueryCall,
    ToolSpecConflict,
    TooManyTools,
    WorkerIdTaken,
    WorkerLink,
    WorkerRegistration,
    WorkerSnapshot,
    WorkspaceHeld,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_TOOLS",
    "DEFAULT_NO_WORKER_WAIT",
    "Assignment",
    "InvalidRegistration",
    "LinkFault",
    "PlacementObserver",
    "PoolClosed",
    "QueryCall",
    "TooManyTools",
    "ToolSpecConflict",
    "WorkerIdTaken",
    "WorkerLink",
    "WorkerPool",
    "WorkerRegistration",
    "WorkerSnapshot",
    "WorkspaceHeld",
]
