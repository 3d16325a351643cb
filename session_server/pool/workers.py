"""The connected workers: who they are, what they offer, their credit, and who owns a worker id."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from session_server.arguments import check_schema
from session_server.pool.types import (
    InvalidRegistration,
    ToolSpecConflict,
    TooManyTools,
    WorkerIdTaken,
    WorkerLink,
    WorkerRegistration,
    WorkerSnapshot,
    WorkspaceHeld,
)
from tool_worker.merkle import Holding
from tool_worker.registry import TOOL_NAME
from tool_worker.tools.base import Lane, ToolSpec

if TYPE_CHECKING:
    from session_server.pool.pool import Pending


@dataclass(eq=False)
class Worker:
    """One connected worker, as long as its stream lives."""

    reg: WorkerRegistration
    link: WorkerLink
    connected_at: float  # epoch seconds
    last_seen: float  # the pool's clock
    tools: dict[str, ToolSpec]
    # Tools whose required labels this worker carries: routing checks one set membership.
    runnable: frozenset[str]
    reconnect_token: str
    # Calls outstanding on it, by dispatch id: its credit is slots - len(in_flight).
    in_flight: dict[str, Pending] = field(default_factory=dict)
    draining: bool = False
    # What it reported holding, by workspace (routing prefers workers holding a call's snapshot).
    holdings: dict[str, Holding] = field(default_factory=dict)
    completed: int = 0
    max_in_flight_seen: int = 0

    @property
    def id(self) -> str:
        return self.reg.worker_id

    @property
    def free_slots(self) -> int:
        return self.reg.slots - len(self.in_flight)


# A worker's --root directories. Routing compares a call's workspace with each root of each
# capable worker, on the event loop: 100,000 short roots (a Hello under 1 MB) cost every call to be
# placed about a second. No path the kernel opens is longer than MAX_ROOT_BYTES.
MAX_WORKSPACE_ROOTS = 64
MAX_ROOT_BYTES = 4096

# Longest worker_id, hostname, version, label key or label value a Hello may carry.
MAX_IDENTITY_CHARS = 256


def validate_registration(reg: WorkerRegistration, server_execute_tools: frozenset[str] = frozenset()) -> None:
    if not reg.worker_id.strip():
        raise InvalidRegistration("hello.worker_id is empty: give each worker a unique id")
    for field_name, value in (("worker_id", reg.worker_id), ("hostname", reg.hostname), ("version", reg.version)):
        _check_printable(field_name, value)
    for key, value in reg.labels.items():
        _check_printable("labels key", key)
        _check_printable(f"labels[{key!r}]", value)
    if reg.slots < 1:
        raise InvalidRegistration(f"hello.slots is {reg.slots}: a worker needs at least 1 slot")
    if not reg.tools:
        raise InvalidRegistration("hello.tools is empty: a worker must offer at least one tool")
    if len(reg.workspace_roots) > MAX_WORKSPACE_ROOTS:
        raise InvalidRegistration(f"hello.workspace_roots names {len(reg.workspace_roots):,} directories; at most "
                                  f"{MAX_WORKSPACE_ROOTS} roots")
    for root in reg.workspace_roots:
        if len(root.encode("utf-8", "surrogateescape")) > MAX_ROOT_BYTES:
            raise InvalidRegistration(f"hello.workspace_roots: {root[:80]!r}... is longer than {MAX_ROOT_BYTES} bytes")
        if not root.startswith("/"):
            # Routing compares roots with the server's workspace paths, which are absolute.
            raise InvalidRegistration(f"hello.workspace_roots: {root[:80]!r} is not an absolute path (give each "
                                      "root as the path that begins with /)")
    seen: set[str] = set()
    for spec in reg.tools:
        if not spec.name:
            raise InvalidRegistration("hello.tools has a tool without a name")
        if not TOOL_NAME.fullmatch(spec.name):
            raise InvalidRegistration(
                f"hello.tools: tool name {spec.name[:80]!r} is not 1-64 letters, digits, '_' or '-' (what "
                "model APIs accept)"
            )
        if spec.lane is not Lane.QUERY:
            raise InvalidRegistration(
                f"hello.tools: {spec.name!r} is in the {spec.lane.name} lane: workers run Query tools only "
                "(Execute calls run on the session server, one at a time)"
            )
        if spec.name in server_execute_tools:
            raise InvalidRegistration(
                f"hello.tools: {spec.name!r} is one of the server's Execute tools, which run on the server "
                "only: give the worker's tool another name"
            )
        if spec.name in seen:
            raise InvalidRegistration(f"hello.tools offers {spec.name!r} twice: tool names must be unique")
        seen.add(spec.name)
        try:
            check_schema(spec.name, spec.parameters)
        except ValueError as exc:
            raise InvalidRegistration(f"hello.tools: {exc}") from None


def _check_printable(field_name: str, value: str) -> None:
    # These go into log lines about the worker and into ListWorkers: a line break in one forged
    # log lines, and a long one was repeated whole on every line.
    if len(value) > MAX_IDENTITY_CHARS:
        raise InvalidRegistration(f"hello.{field_name} is {len(value):,} characters; at most {MAX_IDENTITY_CHARS}")
    if not value.isprintable():
        raise InvalidRegistration(
            f"hello.{field_name} {value[:80]!r} holds a control or other unprintable character: use printable text"
        )


class WorkerDirectory:
    """Workers by id. An id belongs to one live stream (see `admit`)."""

    def __init__(self, clock: Callable[[], float], server_execute_tools: frozenset[str] = frozenset(),
                 server_tools: frozenset[str] = frozenset(), max_tools: int = 0) -> None:
        self._clock = clock
        self._server_execute_tools = server_execute_tools
        # Every name the server offers a model itself (its Query and Execute tools), and the most
        # names the server and its ready workers may offer together (0: no limit).
        self._server_tools = server_tools
        self._max_tools = max_tools
        self._workers: dict[str, Worker] = {}

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._workers.values())

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def holder(self, reg: WorkerRegistration) -> Worker | None:
        """The live worker this registration would replace; WorkerIdTaken when it may not, and
        ToolSpecConflict when it offers a tool another worker offers with another spec, TooManyTools
        when the names it adds would take the pool past its limit.

        A live id is taken over only by a Hello carrying the holder's reconnect token: a worker
        reconnecting after its connection broke, before the hub noticed. Anyone else (a second
        worker started with the same --id, or an impostor) is refused.
        """
        validate_registration(reg, self._server_execute_tools)
        old = self._workers.get(reg.worker_id)
        if old is not None and not (
            reg.reconnect_token and hmac.compare_digest(reg.reconnect_token, old.reconnect_token)
        ):
            raise WorkerIdTaken(reg.worker_id)
        self._check_specs(reg)
        self._check_tool_count(reg)
        return old

    def _check_tool_count(self, reg: WorkerRegistration) -> None:
        """TooManyTools when the names the registration adds to those offered now (the server's own
        and its ready workers', the worker it replaces left out) pass the limit. A worker offering
        names already offered adds capacity, not names, and always joins."""
        if not self._max_tools:
            return
        offered = self._offered(leaving=reg.worker_id)
        new_names = [spec.name for spec in reg.tools if spec.name not in offered]
        if new_names and len(offered) + len(new_names) > self._max_tools:
            raise TooManyTools(self._max_tools, len(offered), new_names)

    def _offered(self, leaving: str = "") -> set[str]:
        """The tool names models are offered: the server's own and its ready workers' (but
        `leaving`'s, the worker a registration replaces)."""
        offered = set(self._server_tools)
        for worker in self._workers.values():
            if worker.id != leaving and not worker.draining:
                offered.update(worker.tools)
        return offered

    def tool_usage(self) -> tuple[int, int]:
        """(tool names offered now, --max-tools), as the admission limits report theirs."""
        return len(self._offered()), self._max_tools

    def _check_specs(self, reg: WorkerRegistration) -> None:
        """ToolSpecConflict when a ready worker (other than the one this registration replaces)
        offers one of its tools with another spec. Draining workers are leaving: a new spec may
        join once the old one's workers drain."""
        for spec in reg.tools:
            for worker in self._workers.values():
                if worker.id == reg.worker_id or worker.draining:
                    continue
                theirs = worker.tools.get(spec.name)
                if theirs is not None and theirs != spec:
                    raise ToolSpecConflict(spec.name, worker.id)

    def add(self, reg: WorkerRegistration, link: WorkerLink) -> Worker:
        runnable = frozenset(
            t.name for t in reg.tools if all(reg.labels.get(k) == v for k, v in t.required_labels.items())
        )
        worker = Worker(
            reg=reg,
            link=link,
            connected_at=time.time(),
            last_seen=self._clock(),
            tools={t.name: t for t in reg.tools},
            runnable=runnable,
            reconnect_token=secrets.token_urlsafe(24),
            holdings={h.workspace: h for h in reg.holdings},
        )
        self._workers[reg.worker_id] = worker
        return worker

    def remove(self, worker: Worker) -> bool:
        """False when the worker was already gone (or its id now belongs to a newer stream)."""
        if self._workers.get(worker.id) is worker:
            del self._workers[worker.id]
            return True
        return False

    def offers(self, tool_name: str) -> bool:
        """Whether a ready worker offers the tool (cheap: asked once per call)."""
        return any(not w.draining and tool_name in w.tools for w in self._workers.values())

    def offered_tools(self) -> dict[str, ToolSpec]:
        """Tools offered by at least one ready worker (ready workers agree on each spec: `_check_specs`)."""
        offered: dict[str, ToolSpec] = {}
        for worker in self._workers.values():
            if not worker.draining:
                for name, spec in worker.tools.items():
                    offered.setdefault(name, spec)
        return offered

    def capacity(self) -> tuple[int, int]:
        """(total slots, calls in flight) over connected workers."""
        return (
            sum(w.reg.slots for w in self._workers.values()),
            sum(len(w.in_flight) for w in self._workers.values()),
        )

    def snapshot(self, worker: Worker) -> WorkerSnapshot:
        return WorkerSnapshot(
            worker_id=worker.id,
            version=worker.reg.version,
            hostname=worker.reg.hostname,
            peer=worker.reg.peer,
            labels=dict(worker.reg.labels),
            tools=sorted(worker.tools),
            slots=worker.reg.slots,
            in_flight=len(worker.in_flight),
            workspace_roots=list(worker.reg.workspace_roots),
            draining=worker.draining,
            connected_at=worker.connected_at,
            last_seen=time.time() - (self._clock() - worker.last_seen),
            workspaces={ws: WorkspaceHeld(h.mode, h.digest, h.reason) for ws, h in sorted(worker.holdings.items())},
            completed=worker.completed,
            max_in_flight_seen=worker.max_in_flight_seen,
        )
