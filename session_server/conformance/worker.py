"""`codelane conformance worker -- COMMAND...`: does a tool worker follow the worker protocol?

The kit starts a real hub (the server's WorkerHubService and WorkerPool) on 127.0.0.1, launches the
command against it, and runs the checks of `CHECKS` in order, each with the shared `WorkerContext`.
Each prints `PASS name: why` or `FAIL name: why`; the run fails if any check does.

A check is `async def check(ctx) -> str`: it returns what it saw (one line) or raises
`CheckFailed`. To add one, write the function and list it in `CHECKS` where its turn comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from session_server.conformance.checks import DEFAULT_WITHIN, START_WITHIN, CheckFailed, Outcome, Skipped, run_all
from session_server.conformance.hub import EXCLUDED_PATH, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, ConformanceHub, Record
from session_server.pool import QueryCall
from tool_worker.merkle import SHARED, SYNCED, UNAVAILABLE, SnapshotRef
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

# The file each call's workspace holds; generated string arguments name it, so a tool that reads
# a path finds something to read.
SAMPLE_FILE = "conformance.txt"
SAMPLE_TEXT = "the quick brown fox\njumps over the lazy dog\n"
# Failures of the hub's own making, never the worker's answer.
_HUB_OUTCOMES = (ErrorKind.NO_WORKER, ErrorKind.TIMEOUT, ErrorKind.WORKER_LOST, ErrorKind.CANCELLED)


@dataclass
class WorkerContext:
    """What the checks share: the hub, the worker command and process, what was learnt so far."""

    command: Sequence[str]
    hub: ConformanceHub
    record: Record
    workspace: Path
    log_dir: Path
    within: float = DEFAULT_WITHIN
    tool: str | None = None
    arguments_json: str | None = None
    process: subprocess.Popen[bytes] | None = None
    worker_id: str = ""
    spec: ToolSpec | None = None
    slots: int = 0
    # The workspace's snapshot every call names (Assign.snapshot), newest first taken.
    snapshot: SnapshotRef | None = None
    _calls: int = 0
    _launches: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- the worker process --------------------------------------------------------------------

    def launch(self, token: str, name: str) -> subprocess.Popen[bytes]:
        """Starts the command with `{hub}` and `{token}` replaced (and in $CODELANE_HUB and
        $CODELANE_WORKER_TOKEN), its output in log_dir/NAME.log, in a process group of its own."""
        argv = [part.replace("{hub}", self.hub.address).replace("{token}", token) for part in self.command]
        env = {**os.environ, "CODELANE_HUB": self.hub.address, "CODELANE_WORKER_TOKEN": token}
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self._launches.append(proc)
        return proc

    async def exit_code(self, proc: subprocess.Popen[bytes], within: float) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), within)
        except TimeoutError:
            return None

    async def stop_all(self) -> None:
        for proc in self._launches:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                if await self.exit_code(proc, 5.0) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.to_thread(proc.wait)
            # What the worker started (a wrapper's child) goes with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    # -- calls ---------------------------------------------------------------------------------

    @property
    def pool(self):
        return self.hub.pool

    def connected(self) -> bool:
        return self.worker_id != "" and self.pool.worker(self.worker_id) is not None

    def require_worker(self) -> None:
        if not self.worker_id or self.spec is None:
            raise Skipped("no worker connected")
        if not self.connected():
            raise CheckFailed(f"worker {self.worker_id} is no longer connected ({self.last_departure()})")

    def last_departure(self) -> str:
        mine = [d for d in self.record.departures if d.worker_id == self.worker_id]
        if mine:
            return f"it left: {mine[-1].reason}"
        if self.process is not None and self.process.poll() is not None:
            return f"its process exited with status {self.process.returncode}"
        return "it never said why"


    async def take_snapshot(self) -> SnapshotRef:
        """Snapshots the workspace as it is now; later calls name this snapshot."""
        snapshots = self.hub.snapshots.of(str(self.workspace))
        snapshots.changed()
        self.snapshot = (await snapshots.current()).ref
        return self.snapshot

    def holdings(self) -> list:
        """What this worker reported holding of the workspace, in order."""
        return [h for w, h in self.record.holdings if w == self.worker_id and h.workspace == str(self.workspace)]

    def call(self, arguments_json: str | None = None, *, timeout: float | None = None) -> QueryCall:
        self._calls += 1
        return QueryCall(
            session_id="conformance",
            call_id=f"conformance-{self._calls}",
            tool_name=self.spec.name,
            arguments_json=self.arguments_json if arguments_json is None else arguments_json,
            workspace=str(self.workspace),
            idempotent=False,  # a call is never retried elsewhere: what the kit sees is this worker's
            timeout=timeout or self.within,
            max_attempts=1,
            snapshot=self.snapshot,
        )

    async def run(self, call: QueryCall) -> ToolResult:
        return await self.pool.dispatch(call)

    def stray(self) -> str:
        ids = [d for w, d in self.record.stray_results if w == self.worker_id]
        return f"; it sent results for dispatch ids it was never given: {', '.join(ids[:3])}" if ids else ""

    def answered(self, result: ToolResult) -> None:
        """CheckFailed unless `result` is the worker's own answer."""
        if result.error_kind in _HUB_OUTCOMES:
            raise CheckFailed(f"no answer from the worker: {result.output}{self.stray()}")
        if result.worker_id != self.worker_id:
            raise CheckFailed(f"the result came from {result.worker_id!r}, not {self.worker_id!r}")


Check = Callable[[WorkerContext], Awaitable[str]]


# -- the checks, in order --------------------------------------------------------------------------


async def check_hello(ctx: WorkerContext) -> str:
    """Hello/Welcome: the worker connects with the token, its Hello is accepted, it offers a Query tool."""
    ctx.process = ctx.launch(ctx.hub.token, "worker")
    within = max(ctx.within, START_WITHIN)
    if not await ctx.record.until(lambda: bool(ctx.record.registrations) or ctx.process.poll() is not None,
                                  within):
        raise CheckFailed(f"no Hello accepted within {within:g}s")
    if not ctx.record.registrations:
        raise CheckFailed(f"the worker exited with status {ctx.process.returncode} before its Hello was accepted")
    reg = ctx.record.registrations[0]
    ctx.worker_id, ctx.slots = reg.worker_id, reg.slots
    queries = [spec for spec in reg.tools if spec.lane is Lane.QUERY]
    if not queries:
        raise CheckFailed(f"worker {reg.worker_id} offers no Query-lane tool ({', '.join(t.name for t in reg.tools)})")
    if ctx.tool is not None:
        named = [spec for spec in queries if spec.name == ctx.tool]
        if not named:
            raise CheckFailed(f"worker {reg.worker_id} does not offer --tool {ctx.tool}")
        queries = named
    ctx.spec = sorted(queries, key=lambda spec: spec.name)[0]
    if ctx.arguments_json is None:
        ctx.arguments_json = json.dumps(sample_arguments(ctx.spec.parameters))
    return (f"worker {reg.worker_id} (version {reg.version or '?'}) offers {', '.join(t.name for t in reg.tools)} "
            f"with {reg.slots} slots; calls use {ctx.spec.name} {ctx.arguments_json}")


async def check_heartbeats(ctx: WorkerContext) -> str:
    """Heartbeats every Welcome.heartbeat_interval (the kit's is shorter than any default)."""
    ctx.require_worker()
    beats = ctx.record.heartbeats.setdefault(ctx.worker_id, [])
    seen = len(beats)
    wanted = 4
    # Long enough for them at the Welcome's interval whatever --within is, short of being lost.
    window = max(ctx.within, HEARTBEAT_TIMEOUT * 0.9)
    if not await ctx.record.until(lambda: len(beats) >= seen + wanted or not ctx.connected(), window):
        raise CheckFailed(f"{len(beats) - seen} heartbeats in {window:g}s (Welcome asked for one every "
                          f"{HEARTBEAT_INTERVAL:g}s)")
    if not ctx.connected():
        raise CheckFailed(f"the worker was lost while the kit counted heartbeats ({ctx.last_departure()})")
    window = beats[seen - 1 if seen else 0:]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    largest = max(gaps)
    if largest > HEARTBEAT_TIMEOUT / 2:
        raise CheckFailed(f"a gap of {largest:.2f}s between heartbeats; Welcome.heartbeat_interval is "
                          f"{HEARTBEAT_INTERVAL:g}s (does the worker use the interval the hub sent?)")
    return f"{len(window)} heartbeats, largest gap {largest:.2f}s (interval {HEARTBEAT_INTERVAL:g}s)"


async def check_content_sync(ctx: WorkerContext) -> str:
    """Content sync: every Assign names a snapshot; the worker runs the call on exactly that tree (its
    own digest of the server's path, computed with the snapshot's exclusions, or a copy fetched
    from the hub's CAS) and reports what it holds in Holdings. After the workspace changes, calls
    name a newer snapshot and the worker moves to it."""
    ctx.require_worker()
    first = ctx.snapshot
    ctx.answered(await ctx.run(ctx.call()))
    await asyncio.to_thread((ctx.workspace / SAMPLE_FILE).write_text, SAMPLE_TEXT + "changed by the kit\n")
    second = await ctx.take_snapshot()
    ctx.answered(await ctx.run(ctx.call()))

    def presented() -> list:
        return [h for h in ctx.holdings() if h.digest == second.digest and h.mode in (SHARED, SYNCED)]

    if not ctx.holdings():
        raise Skipped("the worker reported no Holdings: fine for tools that never read the workspace, but a worker "
                      "that runs tools on it must say what it holds")
    if not await ctx.record.until(lambda: bool(presented()) or not ctx.connected(), ctx.within):
        last = ctx.holdings()[-1]
        why = f" ({last.reason})" if last.reason else ""
        raise CheckFailed(f"after the change it reported holding {last.mode} {last.digest}{why}, not the call's "
                          f"snapshot {second.digest}")
    if [h for h in ctx.holdings() if h.mode == UNAVAILABLE]:
        bad = next(h for h in ctx.holdings() if h.mode == UNAVAILABLE)
        raise CheckFailed(f"it reported the workspace unavailable: {bad.reason}")
    modes = sorted({h.mode for h in ctx.holdings()
                    if h.digest in (first.digest, second.digest) and h.mode in (SHARED, SYNCED)})
    return f"held snapshot {first.digest.hash[:12]} then {second.digest.hash[:12]} after a change ({', '.join(modes)})"


async def check_assign(ctx: WorkerContext) -> str:
    """Assign -> CallResult with the same dispatch_id."""
    ctx.require_worker()
    result = await ctx.run(ctx.call())
    ctx.answered(result)
    if stray := ctx.stray():
        raise CheckFailed(stray.removeprefix("; "))
    how = f"error {result.error_kind.value}" if result.is_error else "success"
    return f"answered with {how} in {result.run_time * 1e3:.1f} ms (as it measured): {_clip(result.output)}"


async def check_invalid_arguments(ctx: WorkerContext) -> str:
    """Arguments it cannot use (not JSON, not an object, against the schema) get an error result,
    and the stream goes on."""
    ctx.require_worker()
    bad = ['{"unterminated": ', "[1, 2]", json.dumps(schema_violation(ctx.spec.parameters))]
    kinds = []
    for arguments in bad:
        result = await ctx.run(ctx.call(arguments))
        ctx.answered(result)
        if not result.is_error:
            raise CheckFailed(f"arguments {arguments} were answered as a success: {_clip(result.output)}")
        kinds.append(result.error_kind.value if result.error_kind else "unspecified")
    ctx.require_worker()
    return f"{len(bad)} error results ({', '.join(kinds)}), still connected"


async def check_concurrency(ctx: WorkerContext) -> str:
    """More calls at once than its slots: each gets its result, never more outstanding than slots."""
    ctx.require_worker()
    count = 2 * ctx.slots + 1
    results = await asyncio.gather(*(ctx.run(ctx.call()) for _ in range(count)))
    for result in results:
        ctx.answered(result)
    snapshot = ctx.pool.worker(ctx.worker_id)
    if snapshot is None:
        raise CheckFailed(f"the worker left ({ctx.last_departure()})")
    if snapshot.max_in_flight_seen > ctx.slots:
        raise CheckFailed(f"{snapshot.max_in_flight_seen} calls were outstanding at once, over its {ctx.slots} slots")
    return f"{count} calls all answered; at most {snapshot.max_in_flight_seen} outstanding at once ({ctx.slots} slots)"


async def check_cancel(ctx: WorkerContext) -> str:
    """Cancel: the worker still answers the cancelled call (freeing its slot) and takes the next one."""
    ctx.require_worker()
    pending = asyncio.ensure_future(ctx.run(ctx.call()))
    if not await ctx.record.until(lambda: bool(ctx.pool.in_flight_ids(ctx.worker_id)) or pending.done(),
                                  ctx.within):
        raise CheckFailed("the call to cancel was never assigned")
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    if not await ctx.record.until(lambda: not ctx.pool.in_flight_ids(ctx.worker_id) or not ctx.connected(),
                                  ctx.within):
        raise CheckFailed(f"no CallResult for the cancelled call within {ctx.within:g}s: its slot stays taken")
    ctx.require_worker()
    ctx.answered(await ctx.run(ctx.call()))
    return "the cancelled call was answered and the next call ran"


async def check_wrong_token(ctx: WorkerContext) -> str:
    """A wrong token: the hub refuses the stream (UNAUTHENTICATED) and the worker gives up, non-zero."""
    before = len(ctx.record.registrations)
    impostor = ctx.launch(f"wrong-{secrets.token_hex(8)}", "wrong-token")
    within = max(ctx.within, START_WITHIN)
    code = await ctx.exit_code(impostor, within)
    if len(ctx.record.registrations) > before:
        raise CheckFailed("a worker with a wrong token was registered")
    if code is None:
        raise CheckFailed(f"the worker was still running {within:g}s after it started with a wrong token: it should "
                          "stop once the hub refuses it, reconnecting cannot help")
    if code == 0:
        raise CheckFailed("the worker exited with status 0 after the hub refused its token")
    return f"refused, and the worker exited with status {code}"


async def check_hub_restart(ctx: WorkerContext) -> str:
    """The hub goes away and comes back on the same address: the worker reconnects."""
    ctx.require_worker()
    before = len(ctx.record.registrations)
    started = time.monotonic()
    await ctx.hub.restart()
    within = max(ctx.within, START_WITHIN)
    if not await ctx.record.until(lambda: len(ctx.record.registrations) > before or ctx.process.poll() is not None,
                                  within):
        raise CheckFailed(f"no reconnection within {within:g}s of the hub's restart")
    if ctx.process.poll() is not None:
        raise CheckFailed(f"the worker exited with status {ctx.process.returncode} when the hub restarted")
    ctx.worker_id = ctx.record.registrations[-1].worker_id
    ctx.answered(await ctx.run(ctx.call()))
    return f"reconnected {time.monotonic() - started:.1f}s after the restart, and ran a call"


async def check_drain(ctx: WorkerContext) -> str:
    """Drain: the worker says Draining, finishes its call, half-closes; the hub ends the stream."""
    ctx.require_worker()
    running = asyncio.ensure_future(ctx.run(ctx.call()))
    if not await ctx.record.until(lambda: bool(ctx.pool.in_flight_ids(ctx.worker_id)) or running.done(),
                                  ctx.within):
        raise CheckFailed("the call was never assigned")
    ctx.pool.drain(ctx.worker_id, "conformance check")
    result = await running
    ctx.answered(result)
    left = await ctx.record.until(lambda: not ctx.connected(), ctx.within)
    if ctx.worker_id not in ctx.record.draining:
        raise CheckFailed("the worker never sent Draining after the hub's Drain")
    if not left:
        raise CheckFailed(f"the worker did not close its stream within {ctx.within:g}s of Drain")
    departure = [d for d in ctx.record.departures if d.worker_id == ctx.worker_id][-1]
    if departure.cause != "drained":
        raise CheckFailed(f"the stream ended otherwise than by a half-close after Draining: {departure.reason}")
    code = await ctx.exit_code(ctx.process, ctx.within)
    exited = "it stayed running" if code is None else f"it exited with status {code}"
    return f"Draining, the running call answered, then a half-close; {exited}"


CHECKS: list[tuple[str, Check]] = [
    ("hello", check_hello),
    ("heartbeats", check_heartbeats),
    ("content-sync", check_content_sync),
    ("assign", check_assign),
    ("invalid-arguments", check_invalid_arguments),
    ("concurrency", check_concurrency),
    ("cancel", check_cancel),
    ("wrong-token", check_wrong_token),
    ("hub-restart", check_hub_restart),
    ("drain", check_drain),
]


# -- arguments made from a schema -----------------------------------------------------------------


def sample_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments satisfying the common subset of JSON Schema: each required property with a plain
    value of its type (strings name SAMPLE_FILE)."""
    properties = schema.get("properties", {})
    return {name: _sample(properties.get(name, {})) for name in schema.get("required", [])}


def _sample(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "string")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind in ("integer", "number"):
        return max(schema.get("minimum", 1), 1)
    return {"boolean": False, "array": [], "object": {}, "null": None}.get(kind, SAMPLE_FILE)


def schema_violation(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments the schema refuses: a required property left out, else one of the wrong type."""
    arguments = sample_arguments(schema)
    if arguments:
        arguments.pop(next(iter(arguments)))
        return arguments
    properties = schema.get("properties", {})
    if properties:
        name, prop = next(iter(properties.items()))
        return {name: [] if prop.get("type") != "array" else "not-an-array"}
    return {"conformance_unexpected_argument": True}


def _sample_workspace(directory: str) -> Path:
    workspace = Path(directory).resolve()
    (workspace / SAMPLE_FILE).write_text(SAMPLE_TEXT)
    (workspace / EXCLUDED_PATH).mkdir()
    (workspace / EXCLUDED_PATH / "held-back.txt").write_text("in no snapshot\n")
    return workspace


def _clip(text: str, limit: int = 60) -> str:
    line = text.strip().replace("\n", " | ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- the run -------------------------------------------------------------------------------------


async def run_checks(command: Sequence[str], *, within: float = DEFAULT_WITHIN, tool: str | None = None,
                     arguments_json: str | None = None, log_dir: Path | None = None,
                     report: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Runs every check against `command`; calls `report` as each one ends."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="codelane-conformance-"))
    record = Record()
    hub = ConformanceHub(secrets.token_urlsafe(16), record)
    with tempfile.TemporaryDirectory(prefix="codelane-conformance-ws-") as directory:
        # Resolved: the hub and the worker must name the workspace alike (/tmp may be a symlink).
        workspace = await asyncio.to_thread(_sample_workspace, directory)
        ctx = WorkerContext(command, hub, record, workspace, log_dir, within, tool, arguments_json)
        await hub.start()
        await ctx.take_snapshot()
        try:
            outcomes = await run_all(CHECKS, ctx, report)
        finally:
            await ctx.stop_all()
            await hub.stop()
            hub.snapshots.close()
    return outcomes
