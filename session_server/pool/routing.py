"""Routing: which workers could run a call (tool, labels) and which one runs it now.

Any capable worker can run a call whatever its workspace: it uses the server's path when it sees
the same files there (shared), or syncs a copy. So routing is a preference, from what workers
report holding (`Holdings`): a worker that holds the call's snapshot, then one holding an older
snapshot of the workspace in its cache (it fetches only what changed), then one on the shared
filesystem (it rescans), then any (it syncs from nothing). Within a rank, the least busy.
"""

from __future__ import annotations

from pathlib import PurePath

from session_server.pool.types import QueryCall
from session_server.pool.workers import Worker
from tool_worker.merkle import SHARED, SYNCED, SYNCING, UNAVAILABLE, Holding

# Workspaces remembered per worker; the oldest report is forgotten first.
MAX_HOLDINGS_PER_WORKER = 256

_HOLDS, _SYNCED_OLDER, _SHARED_OLDER, _UNKNOWN, _UNAVAILABLE = range(5)


def under_roots(workspace: str, roots: tuple[str, ...] | list[str]) -> bool:
    if not roots:
        return True
    path = PurePath(workspace)
    return any(path == PurePath(root) or PurePath(root) in path.parents for root in roots)


class Router:
    """Capability and the choice of a worker."""

    def capable(self, worker: Worker, call: QueryCall) -> bool:
        """Could this worker ever run the call (its free slots aside)?"""
        if worker.draining or call.tool_name not in worker.runnable:
            return False
        if call.required_labels:
            labels = worker.reg.labels
            if any(labels.get(k) != v for k, v in call.required_labels.items()):
                return False
        return True

    def rank(self, worker: Worker, call: QueryCall) -> int:
        holding = worker.holdings.get(call.workspace)
        if holding is None:
            # A worker whose --root covers the workspace probably shares its filesystem.
            roots = worker.reg.workspace_roots
            return _SHARED_OLDER if roots and under_roots(call.workspace, roots) else _UNKNOWN
        if holding.mode == UNAVAILABLE:
            return _UNAVAILABLE
        if call.snapshot is not None and holding.digest == call.snapshot.digest:
            return _HOLDS
        if holding.mode in (SYNCED, SYNCING):
            return _SYNCED_OLDER
        return _SHARED_OLDER if holding.mode == SHARED else _UNKNOWN

    def pick(self, workers: list[Worker] | tuple[Worker, ...], call: QueryCall) -> Worker | None:
        """The capable worker with a free slot that ranks best, the least busy first."""
        best: Worker | None = None
        best_key = (0, 0)
        for worker in workers:
            if worker.free_slots <= 0 or not self.capable(worker, call):
                continue
            key = (self.rank(worker, call), -worker.free_slots)
            if best is None or key < best_key:
                best, best_key = worker, key
        return best

    @staticmethod
    def holds(worker: Worker, holding: Holding) -> None:
        """Records a worker's report."""
        worker.holdings.pop(holding.workspace, None)
        worker.holdings[holding.workspace] = holding
        if len(worker.holdings) > MAX_HOLDINGS_PER_WORKER:
            del worker.holdings[next(iter(worker.holdings))]
