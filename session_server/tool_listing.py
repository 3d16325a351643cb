"""The tools a session's model is offered, and where each one's calls run (SessionService.ListTools)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from session_server.agent import available_tools
from session_server.config import LaneMode, SessionSettings
from session_server.pool import WorkerPool
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import Lane, ToolSpec


class Runner(enum.Enum):
    """Where a tool's calls run. Mirrors codelane.v1.ToolRunner."""

    SERVER = "server"
    WORKERS = "workers"
    EXTERNAL_CLIENT = "external_client"


@dataclass(frozen=True)
class ListedTool:
    spec: ToolSpec
    runner: Runner
    # Ready workers offering the tool now, sorted.
    worker_ids: tuple[str, ...]
    # Whether the server runs the call itself when no worker can.
    server_fallback: bool
    lane_mode: LaneMode


def session_tools(
    settings: SessionSettings, registry: ToolRegistry, pool: WorkerPool, local_fallback: bool,
    local_query_tools: frozenset[str] = frozenset(),
) -> list[ListedTool]:
    """The session's tools, as its next model request would list them, sorted by name."""
    offering: dict[str, list[str]] = {}
    for worker in pool.workers():
        if not worker.draining:
            for name in worker.tools:
                offering.setdefault(name, []).append(worker.worker_id)
    listed = []
    for name, spec in available_tools(registry, pool, local_fallback, settings.permissions).items():
        mode = settings.lane_mode(spec.lane)
        worker_ids = tuple(sorted(offering.get(name, ())))
        # As Turn._run_internal decides: Execute calls run here; Query calls go to a worker when
        # one offers the tool (unless the placement rule keeps the tool here), and run here when
        # none can and the server has the tool itself (one needing workers' labels excepted).
        ours = registry.get(name)
        server_fallback = (spec.lane is Lane.QUERY and local_fallback and ours is not None
                           and not ours.spec.required_labels)
        if mode is LaneMode.EXTERNAL:
            runner = Runner.EXTERNAL_CLIENT
        elif spec.lane is Lane.QUERY and worker_ids and name not in local_query_tools:
            runner = Runner.WORKERS
        else:
            runner = Runner.SERVER
        listed.append(ListedTool(spec, runner, worker_ids, server_fallback, mode))
    return listed
