"""Routing: which workers could run a call (tool, labels, workspace) and which one runs it now.

A worker sees a workspace when it lies under the worker's roots and the worker's fingerprint of
it matches the server's (`tool_worker.fingerprint`). That is found by a probe, the first time a
workspace's call could go to the worker, and found again later: a verdict is only trusted for
`recheck_after` seconds, so one unlucky probe (a file changing between the two fingerprints)
does not hide a worker for good, and a copy that went stale is noticed.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from session_server.pool.types import QueryCall
from session_server.pool.workers import Worker

log = logging.getLogger(__name__)

# How long a probe's verdict stands before the workspace is probed again.
DEFAULT_RECHECK_AFTER = 30.0
# Workspaces remembered per worker; the least recently checked is forgotten first.
MAX_VIEWS_PER_WORKER = 256
# Probes in a row whose fingerprints differ before a worker is taken not to see a workspace: a
# file written between the two fingerprints makes them differ once, a stale copy every time.
PROBES_BEFORE_STALE = 3


class Visibility(enum.Enum):
    PROBING = "probing"
    VISIBLE = "visible"
    INVISIBLE = "invisible"


@dataclass
class WorkspaceView:
    state: Visibility
    reason: str = ""
    probe_id: str = ""
    probe_sent: float = 0.0
    # When the verdict was reached (the pool's clock); 0 while the first probe is out.
    checked: float = 0.0
    # Probes in a row that found the fingerprints different.
    mismatches: int = 0

    @property
    def visible(self) -> bool:
        return self.state is Visibility.VISIBLE


def under_roots(workspace: str, roots: tuple[str, ...] | list[str]) -> bool:
    if not roots:
        return True
    path = PurePath(workspace)
    return any(path == PurePath(root) or PurePath(root) in path.parents for root in roots)


class Router:
    """Capability, visibility and the choice of a worker. `fingerprint(workspace)` is computed
    off the event loop; `on_change()` is called when a verdict may let queued calls go."""

    def __init__(
        self,
        fingerprint: Callable[[str], str],
        *,
        clock: Callable[[], float],
        probe_timeout: float,
        on_change: Callable[[], None],
        recheck_after: float = DEFAULT_RECHECK_AFTER,
    ) -> None:
        self._fingerprint = fingerprint
        self._clock = clock
        self.probe_timeout = probe_timeout
        self.recheck_after = recheck_after
        self._on_change = on_change
        self._probe_ids = itertools.count(1)
        self._probes: dict[str, tuple[Worker, str]] = {}
        self._verifying: set[asyncio.Task[None]] = set()

    def capable(self, worker: Worker, call: QueryCall) -> bool:
        """Could this worker ever run the call (its free slots aside)?"""
        if worker.draining or call.tool_name not in worker.runnable:
            return False
        if call.required_labels:
            labels = worker.reg.labels
            if any(labels.get(k) != v for k, v in call.required_labels.items()):
                return False
        return self.view(worker, call.workspace).state is not Visibility.INVISIBLE

    def pick(self, workers: list[Worker] | tuple[Worker, ...], call: QueryCall) -> Worker | None:
        """The capable worker with a free slot that sees the workspace now, the least busy first."""
        best: Worker | None = None
        for worker in workers:
            if worker.free_slots <= 0 or not self.capable(worker, call):
                continue
            if not worker.views[call.workspace].visible:
                continue
            if best is None or worker.free_slots > best.free_slots:
                best = worker
        return best

    def view(self, worker: Worker, workspace: str) -> WorkspaceView:
        """The worker's view of the workspace, probing it when unknown or when its verdict is old."""
        view = worker.views.get(workspace)
        now = self._clock()
        if view is not None and (view.state is Visibility.PROBING or now - view.checked < self.recheck_after):
            return view
        if not under_roots(workspace, worker.reg.workspace_roots):
            roots = ", ".join(worker.reg.workspace_roots)
            view = WorkspaceView(Visibility.INVISIBLE, f"the workspace is outside the worker's roots ({roots})",
                                 checked=now)
        else:
            probe_id = f"p{next(self._probe_ids)}"
            self._probes[probe_id] = (worker, workspace)
            worker.link.probe(probe_id, workspace)
            if view is not None and view.visible:
                # Re-checking a worker that saw the workspace: it keeps its calls meanwhile.
                view.probe_id, view.probe_sent = probe_id, now
                view.checked = now
                return view
            view = WorkspaceView(Visibility.PROBING, "probe sent", probe_id, now)
        worker.views.pop(workspace, None)
        worker.views[workspace] = view
        if len(worker.views) > MAX_VIEWS_PER_WORKER:
            oldest = min(
                (ws for ws, v in worker.views.items() if v.state is not Visibility.PROBING),
                key=lambda ws: worker.views[ws].checked,
                default=None,
            )
            if oldest is not None:
                del worker.views[oldest]
        return view

    def on_probe_result(self, worker: Worker, probe_id: str, fingerprint: str, error: str) -> None:
        entry = self._probes.pop(probe_id, None)
        if entry is None or entry[0] is not worker:
            return
        workspace = entry[1]
        view = worker.views.get(workspace)
        if view is None or view.probe_id != probe_id:
            return
        if error:
            self._settle(view, Visibility.INVISIBLE, f"the worker cannot read the workspace: {error}")
            return
        # Fingerprinting a big tree takes tens of milliseconds: never on the event loop.
        task = asyncio.get_running_loop().create_task(self._verify(worker, view, workspace, probe_id, fingerprint))
        self._verifying.add(task)
        task.add_done_callback(self._verifying.discard)

    async def _verify(self, worker: Worker, view: WorkspaceView, workspace: str, probe_id: str, theirs: str) -> None:
        ours = None
        try:
            ours = await asyncio.to_thread(self._fingerprint, workspace)
        except OSError as exc:
            state, reason = Visibility.INVISIBLE, f"the server cannot fingerprint the workspace: {exc}"
        except Exception as exc:
            log.exception("fingerprinting %s failed", workspace)
            state, reason = Visibility.INVISIBLE, f"the server cannot fingerprint the workspace: {exc}"
        else:
            if ours == theirs:
                state, reason = Visibility.VISIBLE, ""
            else:
                state = Visibility.INVISIBLE
                reason = "the worker sees a different or stale copy of the workspace (fingerprint differs)"
        if worker.views.get(workspace) is not view or view.probe_id != probe_id:
            return
        if ours is not None and ours != theirs and view.mismatches + 1 < PROBES_BEFORE_STALE:
            # Perhaps a write fell between the two fingerprints: ask again before judging.
            view.mismatches += 1
            new_id = f"p{next(self._probe_ids)}"
            self._probes[new_id] = (worker, workspace)
            view.probe_id, view.probe_sent = new_id, self._clock()
            worker.link.probe(new_id, workspace)
            return
        view.mismatches = 0
        self._settle(view, state, reason)

    def _settle(self, view: WorkspaceView, state: Visibility, reason: str) -> None:
        view.state, view.reason, view.checked = state, reason, self._clock()
        self._on_change()

    def expire_probes(self, worker: Worker) -> None:
        """Probes unanswered for `probe_timeout` make their workspace invisible (until re-checked)."""
        now = self._clock()
        for workspace, view in worker.views.items():
            if view.probe_id in self._probes and now - view.probe_sent > self.probe_timeout:
                self._probes.pop(view.probe_id, None)
                view.state, view.reason = Visibility.INVISIBLE, f"no answer to the probe of {workspace}"
                view.checked = now

    def forget(self, worker: Worker) -> None:
        for probe_id in [p for p, (w, _) in self._probes.items() if w is worker]:
            del self._probes[probe_id]

    async def close(self) -> None:
        for task in self._verifying:
            task.cancel()
        await asyncio.gather(*self._verifying, return_exceptions=True)
