"""One turn of the agent loop: ask the model, schedule its tool calls, record, repeat.

The turn ends when the model answers without tool calls, when `max_turns` model requests are
used up, when it is cancelled, or on a fatal model error. Whatever happens, the history stays
valid: every tool call the model made is answered by exactly one result, in model order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
)
from session_server.external import ExternalTasks
from session_server.llm.base import (
    ChatMessage,
    ModelError,
    ModelProvider,
    ModelRequest,
    ModelResponse,
    ModelToolCall,
    TextChunk,
    ToolCallReady,
    Usage,
)
from session_server.permissions import Action, Decision, PermissionPolicy
from session_server.pool import CallStarted, PoolEvent, QueryCall, WorkerPool
from session_server.scheduler import ScheduledCall, TurnScheduler
from session_server.stats import LaneStats, StatsLane
from session_server.store import StoredMessage
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec
from tool_worker.worker_only import worker_only_hint

LOCAL_WORKER_ID = "local"


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
    load_history: Callable[[], list[StoredMessage]]
    save_messages: Callable[[list[StoredMessage]], None]
    # Server-wide rendezvous for ConfirmToolCall and for external tasks.
    confirmations: Confirmations
    external: ExternalTasks


def available_tools(
    registry: ToolRegistry, pool: WorkerPool, local_fallback: bool, policy: PermissionPolicy | None = None
) -> dict[str, ToolSpec]:
    """Execute tools run here; Query tools are those the workers offer (and ours, as fallback).

    With a `policy`, tools it could never let run (`PermissionPolicy.offers`) are left out.
    """
    tools = {spec.name: spec for spec in registry.specs(Lane.EXECUTE)}
    if local_fallback:
        tools.update({spec.name: spec for spec in registry.specs(Lane.QUERY)})
    for name, spec in pool.offered_tools().items():
        tools.setdefault(name, spec)
    if policy is not None:
        tools = {name: spec for name, spec in tools.items() if policy.offers(name)}
    return dict(sorted(tools.items()))


def history_to_chat(messages: Sequence[StoredMessage]) -> list[ChatMessage]:
    chat = []
    for m in messages:
        if m.role == "assistant":
            calls = [ModelToolCall(c.call_id, c.tool_name, c.arguments_json) for c in m.tool_calls]
            chat.append(ChatMessage("assistant", text=m.text, tool_calls=calls))
        elif m.role == "tool":
            result = m.tool_result
            chat.append(
                ChatMessage(
                    "tool",
                    text=result.output if result else m.text,
                    tool_call_id=m.tool_call_id,
                    is_error=bool(result and result.is_error),
                )
            )
        else:
            chat.append(ChatMessage("user", text=m.text))
    return chat


class Turn:
    def __init__(self, ctx: TurnContext) -> None:
        self.ctx = ctx
        self.usage = Usage()
        self.model_requests = 0
        self.tool_calls = 0
        # Why a cancellation ends the turn: a user's CancelTurn, or the server stopping.
        self.cancel_reason = "cancelled"
        # Per model response: when each call was handed to the scheduler (perf_counter), for
        # queue waits the scheduler cannot see (confirmations, external claims); and the calls
        # the policy says to ask about.
        self._added_at: dict[ScheduledCall, float] = {}
        self._asks: dict[ScheduledCall, Decision] = {}

    async def run(self, user_text: str) -> None:
        ctx = self.ctx
        ctx.emit(TurnStarted(user_text))
        ctx.save_messages([StoredMessage(role="user", text=user_text, turn_id=ctx.turn_id)])
        final_text = ""
        stop = "max_turns"
        try:
            for step in range(ctx.settings.max_turns):
                outcome = await self._step(step)
                final_text = outcome.text
                if outcome.stop is not None:
                    stop = outcome.stop
                    break
        except ModelError as exc:
            ctx.emit(ErrorOccurred(exc.reason, str(exc), True))
            stop = "error"
        except asyncio.CancelledError:
            self._finish(self.cancel_reason, final_text)
            raise
        self._finish(stop, final_text)

    def _finish(self, stop: str, final_text: str) -> None:
        self.ctx.emit(TurnFinished(stop, self.usage, self.model_requests, self.tool_calls, final_text))

    async def _step(self, step: int) -> _StepOutcome:
        ctx = self.ctx
        tools = available_tools(ctx.registry, ctx.pool, ctx.local_fallback, ctx.settings.permissions)
        self._added_at.clear()
        self._asks.clear()
        request = ModelRequest(
            model=ctx.model_name,
            system=ctx.settings.system_prompt,
            messages=history_to_chat(ctx.load_history()),
            tools=list(tools.values()),
        )
        scheduler = TurnScheduler(
            lambda call: self._execute(call, tools, scheduler),
            query_concurrency=ctx.settings.query_concurrency,
            stats=ctx.stats,
            on_finish=self._on_finish,
        )
        added: list[ScheduledCall] = []
        texts: list[str] = []
        response: ModelResponse | None = None
        self.model_requests += 1
        ctx.stats.enqueued(StatsLane.GENERATE)
        started = time.monotonic()
        ctx.stats.started(StatsLane.GENERATE)
        ok = False
        try:
            stream = ctx.provider.stream(request)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, TextChunk):
                        texts.append(item.text)
                        ctx.emit(TextDelta(item.text, step))
                    elif isinstance(item, ToolCallReady):
                        # Only a leading run of Query calls starts before the response is complete:
                        # nothing with side effects runs on a response that may still fail.
                        if len(added) == item.index and self._early_ok(item.call, tools, added):
                            added.append(self._schedule(item.index, item.call, tools))
                            scheduler.add(added[-1])
                    elif isinstance(item, ModelResponse):
                        response = item
            ok = True
        except asyncio.CancelledError:
            partial = ModelResponse("".join(texts), self._as_model_calls(added), Usage(), "cancelled")
            self._announce(step, partial, added)
            await self._record(partial, scheduler, added, cancelled=True)
            raise
        except ModelError:
            scheduler.cancel()
            await scheduler.results()  # early Query calls: read-only, their results are dropped
            raise
        finally:
            ctx.stats.finished(StatsLane.GENERATE, ok, time.monotonic() - started)
        assert response is not None, "a provider stream must end with a ModelResponse"
        self.usage = self.usage + response.usage
        for index, call in enumerate(response.tool_calls[len(added):], start=len(added)):
            added.append(self._schedule(index, call, tools))
            scheduler.add(added[-1])
        self._announce(step, response, added)
        await self._record(response, scheduler, added, cancelled=False)
        if scheduler.cancelled:
            raise asyncio.CancelledError
        return _StepOutcome(response.text, None if response.tool_calls else "end_turn")

    def _announce(self, step: int, response: ModelResponse, added: list[ScheduledCall]) -> None:
        """The response is complete: say which calls it holds, before their results come in."""
        infos = [self._info(c) for c in added]
        self.ctx.emit(ModelResponded(step, infos, response.usage, response.stop_reason))

    async def _record(self, response: ModelResponse, scheduler: TurnScheduler,
                      added: list[ScheduledCall], *, cancelled: bool) -> None:
        """Waits for every call's result, then writes the assistant message and the results."""
        ctx = self.ctx
        if cancelled:
            scheduler.cancel()
        else:
            scheduler.close_input()
        results = await scheduler.results()
        infos = [self._info(c) for c in added]
        messages = [StoredMessage(role="assistant", text=response.text, tool_calls=infos, turn_id=ctx.turn_id)]
        messages += [
            StoredMessage(role="tool", tool_call_id=c.call_id, tool_result=r, turn_id=ctx.turn_id)
            for c, r in zip(added, results, strict=True)
        ]
        ctx.save_messages(messages)
        self.tool_calls += len(added)

    def _early_ok(self, call: ModelToolCall, tools: dict[str, ToolSpec], added: list[ScheduledCall]) -> bool:
        spec = tools.get(call.name)
        return spec is not None and spec.lane is Lane.QUERY and all(c.lane is Lane.QUERY for c in added)

    def _schedule(self, index: int, call: ModelToolCall, tools: dict[str, ToolSpec]) -> ScheduledCall:
        spec = tools.get(call.name)
        call_id = call.call_id or f"call_{uuid.uuid4().hex[:12]}"
        policy = self.ctx.settings.permissions
        if spec is None and self._exists(call.name) and not policy.offers(call.name):
            rejection = ToolResult.error(
                ErrorKind.PERMISSION_DENIED,
                f"{call.name} was not run: this session's permission policy denies every {call.name} call, "
                f"so it is not offered; available tools: {', '.join(tools)}",
            )
            return ScheduledCall(index, call_id, call.name, call.arguments_json, None, rejection)
        if spec is None and worker_only_hint(call.name):
            rejection = _no_worker(call.name, f"{call.name} was not run: no connected worker offers it")
            return ScheduledCall(index, call_id, call.name, call.arguments_json, None, rejection)
        if spec is None:
            rejection = ToolResult.error(
                ErrorKind.UNKNOWN_TOOL, f"unknown tool {call.name!r}; available tools: {', '.join(tools)}"
            )
            return ScheduledCall(index, call_id, call.name, call.arguments_json, None, rejection)
        try:
            arguments = json.loads(call.arguments_json or "{}")
        except json.JSONDecodeError as exc:
            arguments, problem = None, f"are not valid JSON ({exc})"
        else:
            problem = "must be a JSON object"
        if not isinstance(arguments, dict):
            rejection = ToolResult.error(
                ErrorKind.INVALID_ARGUMENTS, f"{call.name} was not run: its arguments {problem}"
            )
            return ScheduledCall(index, call_id, call.name, call.arguments_json, None, rejection)
        decision = policy.decide(call.name, arguments, str(self.ctx.workspace))
        if decision.action is Action.DENY:
            rejection = ToolResult.error(
                ErrorKind.PERMISSION_DENIED,
                f"{call.name} was not run: this session's permission policy denies this call ({decision.describe()}). "
                "Do not retry it; choose another way or ask the user.",
            )
            return ScheduledCall(index, call_id, call.name, call.arguments_json, None, rejection)
        scheduled = ScheduledCall(index, call_id, call.name, call.arguments_json, spec.lane)
        if decision.action is Action.ASK:
            self._asks[scheduled] = decision
        self._added_at[scheduled] = time.perf_counter()
        return scheduled

    def _exists(self, tool_name: str) -> bool:
        return self.ctx.registry.get(tool_name) is not None or self.ctx.pool.offers(tool_name)

    def _info(self, call: ScheduledCall) -> CallInfo:
        lane = call.lane.value if call.lane else ""
        return CallInfo(call.call_id, call.tool_name, call.arguments_json, lane, call.index)

    @staticmethod
    def _as_model_calls(added: list[ScheduledCall]) -> list[ModelToolCall]:
        return [ModelToolCall(c.call_id, c.tool_name, c.arguments_json) for c in added]

    def _on_finish(self, call: ScheduledCall, result: ToolResult) -> None:
        self.ctx.emit(ToolCallFinished(call.call_id, call.tool_name, result, result.queue_wait, result.run_time))

    async def _execute(self, call: ScheduledCall, tools: dict[str, ToolSpec], scheduler: TurnScheduler) -> ToolResult:
        """Runs one call the scheduler let go: confirmation first if the policy asks, then by lane mode."""
        ctx = self.ctx
        spec = tools[call.tool_name]
        assert call.lane is not None, "the scheduler never executes a call without a lane"
        added = self._added_at.get(call, time.perf_counter())
        decision = self._asks.pop(call, None)
        if decision is not None:
            scheduler.waiting(call, "its confirmation")
            refusal = await self._confirm(call, decision)
            scheduler.waiting(call, None)
            if refusal is not None:
                return _timed(refusal, added, time.perf_counter())
        mode = ctx.settings.lane_mode(call.lane)
        if mode is LaneMode.EXTERNAL:
            outcome = await ctx.external.run(
                ctx.session_id, self._info(call), str(ctx.workspace), ctx.settings.external_task_timeout, ctx.emit
            )
            return _timed(outcome.result, added, outcome.claimed_at or time.perf_counter())
        ready = time.perf_counter()
        if mode is LaneMode.HYBRID:
            result = await ctx.external.mirror(
                ctx.session_id, self._info(call), str(ctx.workspace), ctx.settings.lane_timeout(call.lane), ctx.emit,
                lambda: self._run_internal(call, spec),
            )
        else:
            result = await self._run_internal(call, spec)
        # Without a confirmation the scheduler measures the wait itself.
        return _timed(result, added, ready) if decision is not None else result

    async def _confirm(self, call: ScheduledCall, decision: Decision) -> ToolResult | None:
        """Asks for a confirmation and waits for it; None when the call may run, else its refusal."""
        ctx = self.ctx
        policy = ctx.settings.permissions
        within = policy.confirmation_timeout
        ctx.emit(ConfirmationRequired(self._info(call), time.time() + within))
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

    async def _run_internal(self, call: ScheduledCall, spec: ToolSpec) -> ToolResult:
        ctx = self.ctx
        on_workers = call.lane is Lane.QUERY and ctx.pool.offers(call.tool_name)
        if call.lane is Lane.QUERY and not on_workers and not ctx.local_fallback:
            return _no_worker(call.tool_name, f"no connected worker offers {call.tool_name}")
        if on_workers:
            result = await ctx.pool.dispatch(
                QueryCall(
                    session_id=ctx.session_id,
                    call_id=call.call_id,
                    tool_name=call.tool_name,
                    arguments_json=call.arguments_json,
                    workspace=str(ctx.workspace),
                    idempotent=spec.idempotent,
                    timeout=ctx.settings.query_timeout,
                    max_attempts=ctx.settings.max_attempts,
                    on_event=lambda event: self._on_pool_event(call, event),
                )
            )
            if not (result.error_kind is ErrorKind.NO_WORKER and ctx.local_fallback):
                return result
        if ctx.registry.get(call.tool_name) is None:
            problem = result.output if on_workers else f"no worker offers {call.tool_name} any more"
            return _no_worker(call.tool_name, problem)
        ctx.emit(ToolCallStarted(self._info(call), call.lane.value if call.lane else "", LOCAL_WORKER_ID, 1))
        timeout = ctx.settings.query_timeout if call.lane is Lane.QUERY else ctx.settings.execute_timeout
        try:
            result = await asyncio.wait_for(
                ctx.registry.execute(call.tool_name, ctx.workspace, call.arguments_json), timeout
            )
        except TimeoutError:
            return ToolResult.error(
                ErrorKind.TIMEOUT, f"{call.tool_name} timed out after {timeout:g}s on the session server",
                worker_id=LOCAL_WORKER_ID,
            )
        result.worker_id = LOCAL_WORKER_ID
        return result

    def _on_pool_event(self, call: ScheduledCall, event: PoolEvent) -> None:
        ctx = self.ctx
        if isinstance(event, CallStarted):
            ctx.emit(ToolCallStarted(self._info(call), Lane.QUERY.value, event.worker_id, event.attempt))
        else:
            ctx.emit(event)


def _no_worker(tool_name: str, problem: str) -> ToolResult:
    """A NO_WORKER result; for a tool only workers offer, it also says what to start."""
    hint = worker_only_hint(tool_name)
    return ToolResult.error(ErrorKind.NO_WORKER, f"{problem}; {hint}" if hint else problem)


def _timed(result: ToolResult, added: float, started: float) -> ToolResult:
    """`result` with queue_wait from `added` to `started` (lane slot, confirmation, external claim)
    plus whatever wait the runner measured, and run_time from `started` unless the runner measured it."""
    return dataclasses.replace(
        result,
        queue_wait=(started - added) + result.queue_wait,
        run_time=result.run_time or (time.perf_counter() - started),
    )


@dataclass(frozen=True)
class _StepOutcome:
    text: str
    stop: str | None
