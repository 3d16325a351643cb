"""One turn of the agent loop: ask the model, schedule its tool calls, record, repeat.

The turn ends when the model answers without tool calls, when `max_turns` model requests are
used up, when it is cancelled, or on a fatal model error. Whatever happens, the history stays
valid: every tool call the model made is answered by exactly one result, in model order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from session_server.admission import Admission
from session_server.arguments import ARGUMENTS
from session_server.calls import ToolCall
from session_server.config import LaneMode, SessionSettings
from session_server.confirmations import Confirmations
from session_server.events import (
    CallInfo,
    ConfirmationRequired,
    ConfirmationResolved,
    ErrorOccurred,
    EventPayload,
    ModelResponded,
    TextDelta,
    TurnFinished,
    TurnStarted,
)
from session_server.external import ExternalTasks
from session_server.history import History
from session_server.limits import (
    MAX_RESPONSE_ARGUMENTS_CHARS,
    MAX_RESPONSE_TEXT_CHARS,
    MAX_TOOL_ARGUMENTS_CHARS,
    MAX_TOOL_CALLS_PER_RESPONSE,
    OMITTED_ARGUMENTS,
    cut,
)
from session_server.llm.base import (
    ModelError,
    ModelProvider,
    ModelRequest,
    ModelResponse,
    ModelToolCall,
    TextChunk,
    ToolCallReady,
    Usage,
    well_formed_item,
)
from session_server.permissions import Action, Decision, PermissionPolicy
from session_server.pool import QueryCall, WorkerPool
from session_server.scheduler import TurnScheduler
from session_server.snapshots import WorkspaceSnapshots
from session_server.stats import LaneStats
from session_server.store import StoredMessage, store_unavailable
from session_server.telemetry import Telemetry, TurnObservation
from session_server.workspace_locks import WaitedTooLong, WorkspaceLocks
from tool_worker.confinement.protected import operator_denied_globs
from tool_worker.effects import EVERYTHING, Effects, EffectsFunction, in_workspace
from tool_worker.merkle import SnapshotRef
from tool_worker.registry import ToolRegistry, parse_arguments
from tool_worker.telemetry import logs as log_context
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec, bound_result, call_deadline
from tool_worker.worker_only import worker_only_hint

log = logging.getLogger(__name__)

# Snapshots a Query call is sent on before its SNAPSHOT_CHANGED result stands: each is taken
# after the change that made the last one stale, so a second almost always does.
MAX_SNAPSHOTS_PER_CALL = 3

LOCAL_WORKER_ID = "local"
# A model's call ids and tool names longer than this are not kept as they are.
MAX_CALL_ID_CHARS = 256
# Scheduling a response's calls gives the event loop a turn this often: a response with thousands
# of calls must not stall every other session.
_YIELD_EVERY = 64


@dataclass
class TurnContext:
    """What a turn needs from the server; `emit` stores an event, then publishes it."""

    session_id: str
    turn_id: str
    workspace: Path
    settings: SessionSettings
    provider: ModelProvider
    model_name: str
    pool: WorkerPool
    registry: ToolRegistry
    stats: LaneStats
    local_fallback: bool
    emit: Callable[[EventPayload], None]
    history: History
    # Server-wide rendezvous for ConfirmToolCall and for external tasks.
    confirmations: Confirmations
    external: ExternalTasks
    # Metrics and tracing; admission of Query calls (None in tests that need neither).
    telemetry: Telemetry | None = None
    admission: Admission | None = None
    # The workspace's snapshots, named in every call sent to a worker (None: no worker needs them).
    snapshots: WorkspaceSnapshots | None = None
    # The placement rule (--local-query-tools): Query tools run here even when workers offer them,
    # because dispatching a call costs more than running it (a small read).
    local_query_tools: frozenset[str] = frozenset()
    # The default placement rule (off with --no-local-cheap-calls): a Query call whose tool says it
    # is cheaper here than on a worker (`Tool.cheaper_here`: a read of a small file) runs here.
    local_cheap_calls: bool = False
    # The server's holds on workspaces: a command runs alone on its workspace, across sessions.
    workspace_locks: WorkspaceLocks = dataclasses.field(default_factory=WorkspaceLocks)
    # What the workspace's path led to when the turn began (`directory_identity`; None: not
    # checked). A command of another session, on a directory above, may put a symlink in its place
    # while the turn waits for its model or a confirmation: no call runs where the path then leads
    # (the server's data directory, a directory outside --workspace-root).
    workspace_identity: tuple[int, int] | None = None

    @functools.cached_property
    def denied_paths(self) -> tuple[str, ...]:
        """What the turn's tools may not read: the session's read deny globs, and the server's deny
        list where it lies in the workspace (once per turn: it costs tens of microseconds)."""
        return self._denied(confirmed=True)

    @functools.cached_property
    def unconfirmed_denied_paths(self) -> tuple[str, ...]:
        """`denied_paths` for a call nobody confirmed: what the read ask rules name as well."""
        return self._denied(confirmed=False)

    def _denied(self, *, confirmed: bool) -> tuple[str, ...]:
        workspace = str(self.workspace)
        return (*self.settings.permissions.denied_paths(workspace, confirmed=confirmed),
                *operator_denied_globs(self.registry.sandbox.settings, workspace))


def available_tools(
    registry: ToolRegistry, pool: WorkerPool, local_fallback: bool, policy: PermissionPolicy | None = None
) -> dict[str, ToolSpec]:
    """Execute tools run here; Query tools are those the workers offer (and ours, as fallback).

    A worker's tool named like one of ours is ours: the model sees, and arguments are checked
    against, our spec, with or without the fallback (a worker may not redefine `read` for every
    session). With a `policy`, tools it could never let run (`PermissionPolicy.offers`) are left out.
    """
    tools = {spec.name: spec for spec in registry.specs(Lane.EXECUTE)}
    ours = {spec.name: spec for spec in registry.specs(Lane.QUERY)}
    if local_fallback:
        # Not those that need a worker's labels (an accelerator): the server carries none.
        tools.update({name: spec for name, spec in ours.items() if not spec.required_labels})
    for name, spec in pool.offered_tools().items():
        tools.setdefault(name, ours.get(name, spec))
    if policy is not None:
        tools = {name: spec for name, spec in tools.items() if policy.offers(name)}
    return dict(sorted(tools.items()))


class Turn:
    def __init__(self, ctx: TurnContext) -> None:
        self.ctx = ctx
        self.usage = Usage()
        self.model_requests = 0
        self.tool_calls = 0
        # Why a cancellation ends the turn: a user's CancelTurn, or the server stopping.
        self.cancel_reason = "cancelled"
        self.started = False
        # What the rest of the current response's calls may still add in arguments.
        self._arguments_left = MAX_RESPONSE_ARGUMENTS_CHARS
        # The call ids of this step's calls, not in the history yet (see `_make_call`).
        self._call_ids: set[str] = set()
        self._observation: TurnObservation | None = None
        # Clear while an Execute call runs on the server. A Query call bound for a worker takes
        # its snapshot only when it is set: one taken beside a write (even of other files) is not
        # the tree a worker on the same filesystem then scans, and that worker would copy the
        # whole workspace into its cache for the one call.
        self._no_write_running = asyncio.Event()
        self._no_write_running.set()

    async def run(self, user_text: str) -> None:
        """Runs the turn to its end. Whatever happens, it ends with one TurnFinished: a model
        error or any other exception ends it with reason ERROR (and an ErrorOccurred saying why),
        after its calls were cancelled and awaited, with the history left valid."""
        ctx = self.ctx
        log_context.session_id.set(ctx.session_id)
        log_context.turn_id.set(ctx.turn_id)
        if ctx.telemetry is not None:
            # In the turn's task: its invoke_agent span becomes current here, so the turn's model
            # requests and calls are its children.
            self._observation = TurnObservation(ctx.telemetry, ctx.session_id, ctx.turn_id, ctx.settings.model,
                                                ctx.model_name)
        self.started = True
        ctx.emit(TurnStarted(user_text))
        final_text = ""
        stop = "max_turns"
        error = ""
        try:
            ctx.history.append([StoredMessage(role="user", text=user_text, turn_id=ctx.turn_id)])
            for step in range(ctx.settings.max_turns):
                outcome = await self._step(step)
                final_text = outcome.text
                if outcome.stop is not None:
                    stop = outcome.stop
                    break
        except ModelError as exc:
            ctx.emit(ErrorOccurred(exc.reason, str(exc), True))
            stop, error = "error", exc.reason
        except asyncio.CancelledError:
            self._finish(self.cancel_reason, final_text)
            raise
        except Exception as exc:
            if _store_failure(exc):
                # A full disk, say: not a bug of the server, and said as the RPCs say it.
                failure = store_unavailable(exc, "the turn could not store its history")
                log.error("session %s: turn %s ended: %s", ctx.session_id, ctx.turn_id, failure)
                ctx.emit(ErrorOccurred("STORE_UNAVAILABLE", str(failure), True))
                error = "STORE_UNAVAILABLE"
            else:
                log.exception("session %s: turn %s failed", ctx.session_id, ctx.turn_id)
                ctx.emit(ErrorOccurred("INTERNAL", f"the turn failed: {type(exc).__name__}: {exc}", True))
                error = "INTERNAL"
            stop = "error"
        self._finish(stop, final_text, error)

    def finish_unstarted(self, user_text: str) -> None:
        """The events of a turn cancelled before it ran: it started, and finished at once."""
        self.ctx.emit(TurnStarted(user_text))
        self.ctx.emit(TurnFinished(self.cancel_reason, self.usage, 0, 0, ""))

    def _finish(self, stop: str, final_text: str, error: str = "") -> None:
        self.ctx.emit(TurnFinished(stop, self.usage, self.model_requests, self.tool_calls, final_text))
        if self._observation is not None:
            self._observation.end(stop, self.usage, self.model_requests, self.tool_calls, error)

    async def _step(self, step: int) -> _StepOutcome:
        ctx = self.ctx
        if ctx.snapshots is not None:
            # The workspace may have changed since the last step: rescan beside the model request,
            # or, with no worker to need it now, at the first call sent to one that connects
            # meanwhile (which was sent the snapshot of before the change, and read old files).
            if ctx.pool.capacity()[0]:
                ctx.snapshots.changed()
            else:
                ctx.snapshots.invalidate()
        tools = available_tools(ctx.registry, ctx.pool, ctx.local_fallback, ctx.settings.permissions)
        asks: dict[ToolCall, Decision] = {}
        self._arguments_left = MAX_RESPONSE_ARGUMENTS_CHARS
        self._call_ids = set()
        request = ModelRequest(
            model=ctx.model_name,
            system=ctx.settings.system_prompt,
            messages=ctx.history.messages,
            tools=list(tools.values()),
            max_tokens=ctx.settings.max_output_tokens,
        )
        scheduler = TurnScheduler(
            lambda call: self._bounded(self._execute(call, asks)), query_concurrency=ctx.settings.query_concurrency
        )
        calls: list[ToolCall] = []
        texts: list[str] = []
        response: ModelResponse | None = None
        # The Generate lane's figures are kept by the provider's limiter, which knows when a
        # request waits for a --max-llm-requests slot and when it holds one.
        self.model_requests += 1
        try:
            stream = ctx.provider.stream(request)
            async with contextlib.aclosing(stream):
                async for raw in stream:
                    item = well_formed_item(raw)
                    if isinstance(item, TextChunk):
                        texts.append(item.text)
                        ctx.emit(TextDelta(item.text, step))
                    elif isinstance(item, ToolCallReady):
                        if item.index % _YIELD_EVERY == _YIELD_EVERY - 1:
                            await asyncio.sleep(0)
                        # Only a leading run of Query calls starts before the response is complete:
                        # nothing with side effects runs on a response that may still fail.
                        if len(calls) == item.index and self._early_ok(item.call, tools, calls):
                            calls.append(self._make_call(item.index, item.call, tools, asks))
                            scheduler.add(calls[-1])
                    elif isinstance(item, ModelResponse):
                        response = item
            if response is None:
                raise ModelError("INCOMPLETE_RESPONSE", "the model's response ended without its final message")
        except asyncio.CancelledError:
            partial = ModelResponse("".join(texts), [], Usage(), "cancelled")
            await self._record_cut_short(step, partial, scheduler, calls)
            raise
        except BaseException:
            # The response never completed: the early Query calls (read-only) are stopped and
            # their results dropped, so the history holds no call without its response.
            await scheduler.abandon()
            raise
        if len(response.text) > MAX_RESPONSE_TEXT_CHARS:
            response = dataclasses.replace(response, text=cut(response.text, MAX_RESPONSE_TEXT_CHARS, "model text"))
        self.usage = self.usage + response.usage
        # Every call is made before any is scheduled, and the response is announced in the same
        # loop turn as they are: scheduled one by one, with the loop's turns between (a response's
        # calls are made a batch per turn), an Execute call ran before ModelResponded, and a cancel
        # landing meanwhile left its file written and the response out of the history.
        rest: list[ToolCall] = []
        try:
            for index, model_call in enumerate(response.tool_calls[len(calls):], start=len(calls)):
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                rest.append(self._make_call(index, model_call, tools, asks))
        except BaseException as exc:
            # The calls made hold admission and telemetry until they finish: scheduled and
            # cancelled in this same loop turn, they end CANCELLED without running.
            for call in rest:
                calls.append(call)
                scheduler.add(call)
            if isinstance(exc, asyncio.CancelledError):
                await self._record_cut_short(step, response, scheduler, calls)  # as while streaming
            else:
                await scheduler.abandon()
            raise
        try:
            for call in rest:
                calls.append(call)
                scheduler.add(call)
            self._announce(step, response, calls)
        except BaseException:
            await scheduler.abandon()
            raise
        await self._record(response, scheduler, calls, cancelled=False)
        if scheduler.cancelled:
            raise asyncio.CancelledError
        return _StepOutcome(response.text, None if response.tool_calls else "end_turn")

    async def _record_cut_short(self, step: int, response: ModelResponse, scheduler: TurnScheduler,
                                calls: list[ToolCall]) -> None:
        """A cancel cut the step short: the response is announced and recorded with the calls
        made so far (not the rest of the model's), each with its result, cancelled if unfinished."""
        cut_short = dataclasses.replace(response, tool_calls=[_model_call(c) for c in calls])
        self._announce(step, cut_short, calls)
        await self._record(cut_short, scheduler, calls, cancelled=True)

    def _announce(self, step: int, response: ModelResponse, calls: list[ToolCall]) -> None:
        """The response is complete: say which calls it holds, before their results come in."""
        self.ctx.emit(ModelResponded(step, [c.info for c in calls], response.usage, response.stop_reason))

    async def _record(self, response: ModelResponse, scheduler: TurnScheduler,
                      calls: list[ToolCall], *, cancelled: bool) -> None:
        """Waits for every call's result, then writes the assistant message and the results."""
        ctx = self.ctx
        if cancelled:
            scheduler.cancel()
        else:
            scheduler.close_input()
        results = await scheduler.results()
        messages = [StoredMessage(role="assistant", text=response.text, tool_calls=[c.info for c in calls],
                                  turn_id=ctx.turn_id)]
        messages += [
            StoredMessage(role="tool", tool_call_id=c.call_id, tool_result=r, turn_id=ctx.turn_id)
            for c, r in zip(calls, results, strict=True)
        ]
        # Counted first: the calls ran even when the store then refuses their history (a full
        # disk), and TurnFinished says how many ran.
        self.tool_calls += len(calls)
        ctx.history.append(messages)

    def _early_ok(self, call: ModelToolCall, tools: dict[str, ToolSpec], calls: list[ToolCall]) -> bool:
        """Whether the call extends the response's leading run of Query calls. `calls` holds only
        calls that passed this check, so the run so far is Query if its last call is (checking
        them all made a response's 256 calls cost 32,000 steps)."""
        spec = tools.get(call.name)
        return spec is not None and spec.lane is Lane.QUERY and (not calls or calls[-1].lane is Lane.QUERY)

    def _make_call(self, index: int, model_call: ModelToolCall, tools: dict[str, ToolSpec],
                   asks: dict[ToolCall, Decision]) -> ToolCall:
        """The call's owner, with its rejection when it must not run."""
        ctx = self.ctx
        call_id = model_call.call_id
        # An id an earlier call of the session has gets one of ours too: ConfirmToolCall names a
        # call by its id, and a model that gave a read of a secret the id of a harmless read had
        # the person's approval of the one shown run the other (and a late answer to an earlier
        # call, of this turn or of one before, could answer a later one: models number their
        # ids, "call_0"...). Providers pair a result with its call by id too.
        if (not 0 < len(call_id) <= MAX_CALL_ID_CHARS or call_id in self._call_ids
                or call_id in ctx.history.call_ids):
            call_id = f"call_{uuid.uuid4().hex[:12]}"
        self._call_ids.add(call_id)
        arguments_json, refusal = self._check_size(index, model_call)
        if refusal is not None or len(model_call.name) > MAX_CALL_ID_CHARS:
            model_call = dataclasses.replace(
                model_call, name=model_call.name[:MAX_CALL_ID_CHARS], arguments_json=arguments_json
            )
        spec = tools.get(model_call.name)
        arguments, rejection, decision = None, None, None
        if refusal is not None:
            rejection = refusal
        elif model_call.cut_off:
            # Its arguments may lack a tail, or have never come ("{}" would read as "no arguments").
            rejection = ToolResult.error(
                ErrorKind.INVALID_ARGUMENTS,
                f"{model_call.name} was not run: the response was cut off (by its token limit, or by the "
                "provider) before this call's arguments were complete. Make the call again, with shorter "
                "arguments if they were long.",
            )
        elif spec is None:
            rejection = self._unavailable(model_call.name, tools)
        else:
            arguments, problem = parse_arguments(model_call.arguments_json)
            if arguments is None:
                rejection = ToolResult.error(
                    ErrorKind.INVALID_ARGUMENTS, f"{model_call.name} was not run: its arguments {problem}"
                )
            elif (mismatch := ARGUMENTS.problem(spec, arguments)) is not None:
                # Checked here, before any dispatch: a worker is never sent arguments its tool's
                # advertised schema refuses (docs/protocol.md, "Arguments").
                rejection = ToolResult.error(ErrorKind.INVALID_ARGUMENTS, f"{model_call.name} was not run: {mismatch}")
            else:
                decision = ctx.settings.permissions.decide(model_call.name, arguments, str(ctx.workspace))
                if decision.action is Action.DENY:
                    rejection = ToolResult.error(
                        ErrorKind.PERMISSION_DENIED,
                        f"{model_call.name} was not run: this session's permission policy denies this call "
                        f"({decision.describe()}). Do not retry it; choose another way or ask the user.",
                    )
        lane = spec.lane.value if spec is not None and rejection is None else ""
        call = ToolCall(
            CallInfo(call_id, model_call.name, model_call.arguments_json, lane, index),
            ctx.emit,
            spec=spec,
            arguments=arguments,
            rejection=rejection,
            effects=self._effects(model_call.name, arguments, spec) if rejection is None else EVERYTHING,
            stats=ctx.stats,
            telemetry=ctx.telemetry,
            admission=ctx.admission,
            session_id=ctx.session_id,
        )
        if decision is not None and decision.action is Action.ASK and rejection is None:
            asks[call] = decision
        return call

    def _check_size(self, index: int, call: ModelToolCall) -> tuple[str, ToolResult | None]:
        """The arguments to record for a call, and its error result when a limit refuses it: past
        MAX_TOOL_CALLS_PER_RESPONSE calls, or arguments too large alone or with the response's
        other calls. Arguments not kept are recorded as OMITTED_ARGUMENTS."""
        size = len(call.arguments_json)
        keep = size <= MAX_TOOL_ARGUMENTS_CHARS and size <= self._arguments_left
        if keep:
            self._arguments_left -= size
        arguments = call.arguments_json if keep else OMITTED_ARGUMENTS
        name = call.name[:MAX_CALL_ID_CHARS]
        if index >= MAX_TOOL_CALLS_PER_RESPONSE:
            why = (f"the response holds more than {MAX_TOOL_CALLS_PER_RESPONSE} tool calls, and this server runs "
                   f"at most {MAX_TOOL_CALLS_PER_RESPONSE} per response; make fewer calls at a time")
        elif size > MAX_TOOL_ARGUMENTS_CHARS:
            why = (f"its arguments are {size:,} characters, over the limit of {MAX_TOOL_ARGUMENTS_CHARS:,}; "
                   "write large content in several smaller calls (e.g. write, then edit to append)")
        elif not keep:
            why = (f"the arguments of this response's calls add up to more than {MAX_RESPONSE_ARGUMENTS_CHARS:,} "
                   "characters; make fewer or smaller calls at a time")
        else:
            return arguments, None
        return arguments, ToolResult.error(ErrorKind.INVALID_ARGUMENTS, f"{name} was not run: {why}.")

    @staticmethod
    async def _bounded(running: Awaitable[ToolResult]) -> ToolResult:
        return bound_result(await running)

    def _effects(self, tool_name: str, arguments: dict[str, Any] | None,
                 spec: ToolSpec | None) -> Effects | Callable[[], Effects]:
        """What the call may touch, from its tool's declaration (one of ours; a tool only a worker
        knows declares nothing here, so it is ordered against everything).

        An Execute call's paths are resolved now, before it can run and change them; a Query
        call's only when the scheduler first orders it against an Execute call (Query calls
        change nothing, and most turns' Query calls meet no Execute call at all)."""
        tool = self.ctx.registry.get(tool_name)
        if tool is None or tool.effects is None or arguments is None:
            return EVERYTHING
        declared, workspace = tool.effects, str(self.ctx.workspace)
        if spec is not None and spec.lane is Lane.QUERY:
            return lambda: _declared_effects(tool_name, declared, arguments, workspace)
        return _declared_effects(tool_name, declared, arguments, workspace)

    def _unavailable(self, name: str, tools: dict[str, ToolSpec]) -> ToolResult:
        """Why a tool the model named is not offered, as the model should read it."""
        ctx = self.ctx
        listed = ", ".join(tools)
        builtin = ctx.registry.get(name)
        if (builtin is not None or ctx.pool.offers(name)) and not ctx.settings.permissions.offers(name):
            return ToolResult.error(
                ErrorKind.PERMISSION_DENIED,
                f"{name} was not run: this session's permission policy denies every {name} call, "
                f"so it is not offered; available tools: {listed}",
            )
        if builtin is None and worker_only_hint(name):
            return _no_worker(name, f"{name} was not run: no connected worker offers it")
        if builtin is not None and builtin.spec.lane is Lane.QUERY and builtin.spec.required_labels:
            return _no_worker(name, f"{name} was not run: {needs_labels(builtin.spec)}")
        if builtin is not None and builtin.spec.lane is Lane.QUERY and not ctx.local_fallback:
            return ToolResult.error(
                ErrorKind.NO_WORKER,
                f"{name} was not run: no connected tool worker offers it, and this server runs Query tools "
                "only on workers (--no-local-fallback). Start one with `codelane worker --connect ADDRESS`.",
            )
        return ToolResult.error(ErrorKind.UNKNOWN_TOOL, f"unknown tool {name!r}; available tools: {listed}")

    async def _execute(self, call: ToolCall, asks: dict[ToolCall, Decision]) -> ToolResult:
        try:
            return await self._execute_call(call, asks)
        finally:
            if call.lane is Lane.EXECUTE and self.ctx.snapshots is not None:
                # Anything may have changed (bash included): later Query calls bound for a
                # worker wait for a rescan (started now when there are workers to need it).
                if self.ctx.pool.capacity()[0]:
                    self.ctx.snapshots.changed()
                else:
                    self.ctx.snapshots.invalidate()
            if call.lane is not Lane.QUERY:
                # Only the end of a write: a read ending beside a running write must not let a
                # worker-bound call snapshot the workspace while it is written.
                self._no_write_running.set()

    async def _execute_call(self, call: ToolCall, asks: dict[ToolCall, Decision]) -> ToolResult:
        """Runs one call the scheduler let go: confirmation first if the policy asks, then by lane mode."""
        ctx = self.ctx
        assert call.lane is not None, "the scheduler never executes a call without a lane"
        # This runs in the call's own task: what it logs names the call.
        log_context.call_id.set(call.call_id)
        decision = asks.pop(call, None)
        if call.arguments is not None:
            # Decided again now, as it is about to run: it was decided when the model's response
            # came, before the calls ahead of it in that response ran, and one of them may have
            # made a path it names a symlink to a denied one (`ln -s secret out`, then a write to
            # out/key). The stricter of the two decisions holds.
            now = ctx.settings.permissions.decide(call.tool_name, call.arguments, str(ctx.workspace))
            if now.action is Action.DENY:
                return ToolResult.error(
                    ErrorKind.PERMISSION_DENIED,
                    f"{call.tool_name} was not run: this session's permission policy denies this call "
                    f"({now.describe()}), as the workspace stood when it was about to run. Do not retry it; "
                    "choose another way or ask the user.",
                )
            if now.action is Action.ASK and decision is None:
                decision = now
        if decision is not None:
            call.wait_for("its confirmation")
            refusal = await self._confirm(call, decision)
            call.wait_for(None)
            if refusal is not None:
                return refusal
            call.confirmed = True
        mode = ctx.settings.lane_mode(call.lane)
        if mode is LaneMode.EXTERNAL:
            call.wait_for("a client to run it as an external task")
            return await ctx.external.run(
                ctx.session_id, call.info, str(ctx.workspace), ctx.settings.external_task_timeout, ctx.emit, call,
                trace_context=call.trace_context,
            )
        if mode is LaneMode.HYBRID:
            return await ctx.external.mirror(
                ctx.session_id, call.info, str(ctx.workspace), ctx.settings.lane_timeout(call.lane), ctx.emit,
                lambda: self._run_internal(call),
            )
        return await self._run_internal(call)

    async def _confirm(self, call: ToolCall, decision: Decision) -> ToolResult | None:
        """Asks for a confirmation and waits for it; None when the call may run, else its refusal."""
        ctx = self.ctx
        policy = ctx.settings.permissions
        within = policy.confirmation_timeout
        ctx.emit(ConfirmationRequired(call.info, time.time() + within, decision.describe()))
        try:
            answer = await ctx.confirmations.wait(ctx.session_id, call.call_id, within)
        except asyncio.CancelledError:
            # Every ConfirmationRequired ends with a ConfirmationResolved, so no client keeps asking.
            ctx.emit(ConfirmationResolved(call.call_id, "cancelled", "the turn was cancelled before anyone answered"))
            raise
        if answer is None:
            approved = policy.timeout_action is Action.ALLOW
            outcome = "timed_out_approved" if approved else "timed_out_rejected"
            reason = f"nobody confirmed the call within {within:g}s; the timeout action is {policy.timeout_action}"
        else:
            approved, reason = answer.approved, answer.reason
            outcome = "approved" if approved else "rejected"
        ctx.emit(ConfirmationResolved(call.call_id, outcome, reason))
        if approved:
            return None
        if answer is None:
            why = f"nobody confirmed it within {within:g}s, so it was refused"
        else:
            why = f"it was rejected: {reason}" if reason.strip() else "it was rejected (no reason given)"
        return ToolResult.error(
            ErrorKind.PERMISSION_DENIED,
            f"{call.tool_name} was not run: it needed a confirmation ({decision.describe()}) and {why}.",
        )

    async def _run_internal(self, call: ToolCall) -> ToolResult:
        # A command may swap any path of the workspace (a directory for a symlink out of it)
        # between another call's check of a path and its open: it runs alone, across sessions.
        alone = call.lane is Lane.EXECUTE and call.effects is EVERYTHING
        # The lane's timeout is one deadline for the whole call, set here: the wait for another
        # session's command (a Query call otherwise waited as long as that ran, up to 24 h), the
        # local run, the snapshot and each dispatch all count against it. Each stage given the
        # whole timeout afresh let one call take several times its limit.
        timeout = self.ctx.settings.lane_timeout(call.lane)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with self.ctx.workspace_locks.hold(str(self.ctx.workspace), alone=alone, within=timeout,
                                                     waiting=call.wait_for):
                # Checked under the hold: the commands that could swap it wait for the call to end.
                identity = self.ctx.workspace_identity
                if identity is not None and directory_identity(self.ctx.workspace) != identity:
                    return ToolResult.error(
                        ErrorKind.PATH_ESCAPE, f"{call.tool_name} was not run: the workspace {self.ctx.workspace} is "
                        "no longer the directory this turn began in (it, or a directory above it, was replaced while "
                        "the turn ran); the next turn checks it again",
                    )
                return await self._run_placed(call, deadline, timeout)
        except WaitedTooLong as waited:
            return ToolResult.error(
                ErrorKind.TIMEOUT, f"{call.tool_name} was not run: it waited {waited.within:g}s, the session's time "
                f"limit for a call of its lane, for {waited.what} (a command runs alone on its workspace, across "
                "sessions); try again once it has ended",
            )

    async def _run_placed(self, call: ToolCall, deadline: float, limit: float) -> ToolResult:
        """Runs a call where it belongs by `deadline` (event loop time); `limit` is its whole
        time limit, which a TIMEOUT result names."""
        ctx = self.ctx
        denied_paths = ctx.denied_paths if call.confirmed else ctx.unconfirmed_denied_paths
        problem = f"no worker offers {call.tool_name} any more"
        if call.lane is Lane.QUERY and call.tool_name not in ctx.local_query_tools:
            if ctx.pool.offers(call.tool_name):
                if not self._cheaper_here(call):
                    result = await self._dispatch(call, denied_paths, deadline, limit)
                    if result.error_kind is not ErrorKind.NO_WORKER:
                        return result
                    if not ctx.local_fallback:
                        # The pool's words name no command: for a tool only workers offer (its
                        # worker lost, say), the model and operator read which one to start.
                        return _start_hint_added(call.tool_name, result)
                    problem = result.output
            elif not ctx.local_fallback:
                return _no_worker(call.tool_name, f"no connected worker offers {call.tool_name}")
        tool = ctx.registry.get(call.tool_name)
        if tool is None:
            return _no_worker(call.tool_name, problem)
        if tool.spec.required_labels:
            # Its labels say what a host needs to run it (a GPU, say); the server carries none
            # (nor may --local-query-tools name it).
            return _no_worker(call.tool_name, f"{call.tool_name} was not run: {needs_labels(tool.spec)}")
        call.running(LOCAL_WORKER_ID)
        if call.lane is not Lane.QUERY:
            self._no_write_running.clear()  # set again by _execute, once the rescan is asked for
        try:
            async with asyncio.timeout_at(deadline):
                token = call_deadline.set(deadline)
                try:
                    result = await ctx.registry.execute(
                        call.tool_name, ctx.workspace, call.info.arguments_json, denied_paths,
                        policy=ctx.settings.sandbox,
                    )
                finally:
                    call_deadline.reset(token)
        except TimeoutError:
            result = ToolResult.error(
                ErrorKind.TIMEOUT, f"{call.tool_name} timed out after {limit:g}s on the session server",
            )
        return dataclasses.replace(result, worker_id=LOCAL_WORKER_ID)

    def _cheaper_here(self, call: ToolCall) -> bool:
        """The default placement rule: a call its tool says costs less here than on a worker."""
        ctx = self.ctx
        return ctx.local_cheap_calls and ctx.local_fallback and ctx.registry.cheaper_here(
            call.tool_name, ctx.workspace, call.info.arguments_json
        )


    async def _dispatch(self, call: ToolCall, denied_paths: tuple[str, ...], deadline: float,
                        limit: float) -> ToolResult:
        """Runs a Query call on a worker, on a snapshot of the workspace as of now, by `deadline`
        (event loop time; `limit` is the call's whole time limit). The workspace may change before
        the worker fetches it (an Execute call on other files runs beside Query calls): the call
        is then sent again, on a newer snapshot, in what is left of its time."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        traceparent, tracestate = call.trace_context
        first_attempt = snapshots_sent = 1
        while True:
            try:
                # The call's deadline bounds the wait too: a first scan hashes every file, and a
                # huge workspace must not hold the call (and its turn) past it.
                async with asyncio.timeout_at(deadline):
                    snapshot = await self._snapshot()
            except TimeoutError:  # before OSError, of which it is a subclass
                return ToolResult.error(
                    ErrorKind.TIMEOUT, f"{call.tool_name} was not run: the workspace's snapshot for a worker was "
                    f"not ready within the call's {limit:g}s (the server hashes every file "
                    "of a workspace it has not scanned before; a smaller workspace, or a longer Query timeout, helps)",
                )
            except OSError as exc:
                return ToolResult.error(
                    ErrorKind.TOOL_ERROR, f"{call.tool_name} was not run: the workspace cannot be read "
                    f"to snapshot it for a worker ({exc.strerror or exc})",
                )
            left = deadline - loop.time()
            if left <= 0:
                # Its time went waiting (for another session's command, or on earlier snapshots).
                return ToolResult.error(
                    ErrorKind.TIMEOUT, f"{call.tool_name} timed out after {limit:g}s before it was sent to a worker",
                    attempt=first_attempt,
                )
            result = await ctx.pool.dispatch(
                QueryCall(
                    session_id=ctx.session_id,
                    call_id=call.call_id,
                    tool_name=call.tool_name,
                    arguments_json=call.info.arguments_json,
                    workspace=str(ctx.workspace),
                    idempotent=call.spec.idempotent if call.spec else False,
                    timeout=left,
                    limit=limit,
                    # The attempts of earlier snapshots leave the lost-worker retries whole.
                    max_attempts=ctx.settings.max_attempts + first_attempt - 1,
                    observer=call,
                    denied_paths=denied_paths,
                    traceparent=traceparent,
                    tracestate=tracestate,
                    snapshot=snapshot,
                    first_attempt=first_attempt,
                )
            )
            if result.error_kind is not ErrorKind.SNAPSHOT_CHANGED or snapshots_sent == MAX_SNAPSHOTS_PER_CALL:
                return result
            snapshots_sent += 1
            first_attempt = result.attempt + 1
            call.retried(first_attempt, "the workspace changed before the worker fetched its snapshot",
                         result.worker_id)
            if ctx.snapshots is not None:
                ctx.snapshots.changed()

    async def _snapshot(self) -> SnapshotRef | None:
        """The workspace as of now, for a call bound for a worker. Raises OSError."""
        snapshots = self.ctx.snapshots
        if snapshots is None:
            return None
        # One wait, not a loop: the next Execute call may start at once, and a call that waited
        # for every write would wait as if ordered after them.
        await self._no_write_running.wait()
        return (await snapshots.current()).ref


def _declared_effects(
    tool_name: str, declared: EffectsFunction, arguments: dict[str, Any], workspace: str
) -> Effects:
    """What a tool declares its call touches; everything when the declaration fails. A plugin's
    `effects` function that raised, or returned no Effects, ended the whole turn with an error,
    its other calls cancelled unrun: the call is only ordered against every other one instead."""
    try:
        effects = declared(arguments)
        if not isinstance(effects, Effects):
            raise TypeError(f"it returned a {type(effects).__name__}, not Effects")
        return in_workspace(effects, workspace)
    except Exception:
        log.warning("the effects of a %s call could not be worked out: it is ordered against every other call",
                    tool_name, exc_info=True)
        return EVERYTHING


def _store_failure(exc: Exception) -> bool:
    """Whether the store refused its work (SQLite said so), as opposed to the server misusing it
    (ProgrammingError, InterfaceError: a bug, reported INTERNAL with its traceback)."""
    return isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError)


def _model_call(call: ToolCall) -> ModelToolCall:
    return ModelToolCall(call.call_id, call.tool_name, call.info.arguments_json)


def needs_labels(spec: ToolSpec) -> str:
    """Why a tool with required labels found nowhere to run, as the model and operator read it."""
    labels = ", ".join(f"{key}={value}" for key, value in sorted(spec.required_labels.items()))
    return (f"it runs only on workers labelled {labels}, and no connected worker carrying them offers it "
            "(the session server does not run it itself)")


def directory_identity(path: str | Path) -> tuple[int, int]:
    """The device and inode `path` leads to, symlinks followed; (-1, -1) when it leads nowhere."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return (-1, -1)
    return (stat.st_dev, stat.st_ino)


def _no_worker(tool_name: str, problem: str) -> ToolResult:
    """A NO_WORKER result; for a tool only workers offer, it also says what to start."""
    hint = worker_only_hint(tool_name)
    return ToolResult.error(ErrorKind.NO_WORKER, f"{problem}; {hint}" if hint else problem)


def _start_hint_added(tool_name: str, result: ToolResult) -> ToolResult:
    """The pool's NO_WORKER `result`; for a tool only workers offer, it also says what to start."""
    hint = worker_only_hint(tool_name)
    return dataclasses.replace(result, output=f"{result.output}; {hint}") if hint else result


@dataclass(frozen=True)
class _StepOutcome:
    text: str
    stop: str | None
