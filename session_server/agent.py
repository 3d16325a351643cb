"""One turn of the agent loop: ask the model, schedule its tool calls, record, repeat.

The turn ends when the model answers without tool calls, when `max_turns` model requests are
used up, when it is cancelled, or on a fatal model error. Whatever happens, the history stays
valid: every tool call the model made is answered by exactly one result, in model order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from session_server.config import SessionSettings
from session_server.events import (
    CallInfo,
    CallRetried,
    ErrorOccurred,
    EventPayload,
    ModelResponded,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
    WorkerLost,
)
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
from session_server.pool import CallRetried as PoolCallRetried
from session_server.pool import CallStarted as PoolCallStarted
from session_server.pool import PoolEvent, QueryCall, WorkerPool
from session_server.pool import WorkerLost as PoolWorkerLost
from session_server.scheduler import ScheduledCall, TurnScheduler
from session_server.stats import LaneStats, StatsLane
from session_server.store import StoredMessage
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

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


def available_tools(registry: ToolRegistry, pool: WorkerPool, local_fallback: bool) -> dict[str, ToolSpec]:
    """Execute tools run here; Query tools are those the workers offer (and ours, as fallback)."""
    tools = {spec.name: spec for spec in registry.specs(Lane.EXECUTE)}
    if local_fallback:
        tools.update({spec.name: spec for spec in registry.specs(Lane.QUERY)})
    for name, spec in pool.offered_tools().items():
        tools.setdefault(name, spec)
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
        tools = available_tools(ctx.registry, ctx.pool, ctx.local_fallback)
        request = ModelRequest(
            model=ctx.model_name,
            system=ctx.settings.system_prompt,
            messages=history_to_chat(ctx.load_history()),
            tools=list(tools.values()),
        )
        scheduler = TurnScheduler(
            lambda call: self._execute(call, tools),
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
            await self._record(step, partial, scheduler, added, cancelled=True)
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
        await self._record(step, response, scheduler, added, cancelled=False)
        if scheduler.cancelled:
            raise asyncio.CancelledError
        return _StepOutcome(response.text, None if response.tool_calls else "end_turn")

    async def _record(self, step: int, response: ModelResponse, scheduler: TurnScheduler,
                      added: list[ScheduledCall], *, cancelled: bool) -> None:
        """Waits for every call's result, then writes the assistant message and the results."""
        ctx = self.ctx
        if cancelled:
            scheduler.cancel()
        else:
            scheduler.close_input()
        results = await scheduler.results()
        infos = [self._info(c) for c in added]
        ctx.emit(ModelResponded(step, infos, response.usage, response.stop_reason))
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
        return ScheduledCall(index, call_id, call.name, call.arguments_json, spec.lane)

    def _info(self, call: ScheduledCall) -> CallInfo:
        lane = call.lane.value if call.lane else ""
        return CallInfo(call.call_id, call.tool_name, call.arguments_json, lane, call.index)

    @staticmethod
    def _as_model_calls(added: list[ScheduledCall]) -> list[ModelToolCall]:
        return [ModelToolCall(c.call_id, c.tool_name, c.arguments_json) for c in added]

    def _on_finish(self, call: ScheduledCall, result: ToolResult) -> None:
        self.ctx.emit(ToolCallFinished(call.call_id, call.tool_name, result, result.queue_wait, result.run_time))

    async def _execute(self, call: ScheduledCall, tools: dict[str, ToolSpec]) -> ToolResult:
        ctx = self.ctx
        spec = tools[call.tool_name]
        if call.lane is Lane.QUERY and call.tool_name not in ctx.pool.offered_tools() and not ctx.local_fallback:
            return ToolResult.error(ErrorKind.NO_WORKER, f"no connected worker offers {call.tool_name}")
        if call.lane is Lane.QUERY and call.tool_name in ctx.pool.offered_tools():
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
            return ToolResult.error(ErrorKind.NO_WORKER, f"no worker offers {call.tool_name} any more")
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
        if isinstance(event, PoolCallStarted):
            ctx.emit(ToolCallStarted(self._info(call), Lane.QUERY.value, event.worker_id, event.attempt))
        elif isinstance(event, PoolCallRetried):
            ctx.emit(CallRetried(call.call_id, event.attempt, event.reason, event.previous_worker_id))
        elif isinstance(event, PoolWorkerLost):
            ctx.emit(WorkerLost(event.worker_id, event.reason, [call.call_id]))


@dataclass(frozen=True)
class _StepOutcome:
    text: str
    stop: str | None
