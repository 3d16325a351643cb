"""What the server's domain code reports to: its metrics, and its tracer when tracing is on.

Passed down to turns and calls as one object. `tracing` is None when tracing is off, and every
span is guarded by that one check, so an untraced server does no tracing work per call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from session_server.llm.base import Usage
from session_server.metrics import ServerMetrics
from tool_worker.telemetry import logs as log_context

log = logging.getLogger("codelane.turns")

if TYPE_CHECKING:
    from tool_worker.telemetry.tracing import Tracing

# OpenTelemetry GenAI semantic conventions: the attribute names codelane's spans carry.
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
CONVERSATION_ID = "gen_ai.conversation.id"
AGENT_NAME = "gen_ai.agent.name"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
AGENT = "codelane"


@dataclass(frozen=True)
class Telemetry:
    metrics: ServerMetrics
    tracing: Tracing | None = None


class TurnObservation:
    """One turn's metrics (turns by stop reason, their duration) and, tracing on, its
    `invoke_agent` span. Made in the turn's own task: the span, a child of the current one (the
    RPC that started the turn), becomes current there, so the turn's model requests and tool calls
    are its children and its log lines carry its trace id."""

    def __init__(self, telemetry: Telemetry, session_id: str, turn_id: str, model: str, model_name: str) -> None:
        self._telemetry = telemetry
        self._started = time.perf_counter()
        self._span = None
        self._token = None
        tracing = telemetry.tracing
        if tracing is not None:
            self._span = tracing.start(f"invoke_agent {AGENT}", attributes={
                OPERATION: "invoke_agent",
                AGENT_NAME: AGENT,
                CONVERSATION_ID: session_id,
                PROVIDER: model.partition(":")[0],
                REQUEST_MODEL: model_name,
                "codelane.turn.id": turn_id,
            })
            self._token = tracing.attach(self._span)
            log_context.trace_id.set(tracing.trace_id(self._span))

    def end(self, stop: str, usage: Usage, model_requests: int, tool_calls: int, error: str = "") -> None:
        """`error`: the kind of error a turn that stopped on one ended with (AUTHENTICATION, ...)."""
        seconds = time.perf_counter() - self._started
        # The kind, not the message: a provider's message may quote the request. Without it a
        # server whose model key is wrong logged nothing but "turn ended: error" for every turn.
        log.info("turn ended: %s after %.3f s, %d model requests, %d tool calls, %d+%d tokens",
                 f"{stop} ({error})" if error else stop, seconds, model_requests, tool_calls, usage.input_tokens,
                 usage.output_tokens)
        metrics = self._telemetry.metrics
        metrics.turns.labels(stop).inc()
        metrics.turn_duration.labels(stop).observe(seconds)
        span, tracing = self._span, self._telemetry.tracing
        if span is None or tracing is None:
            return
        span.set_attribute(INPUT_TOKENS, usage.input_tokens)
        span.set_attribute(OUTPUT_TOKENS, usage.output_tokens)
        span.set_attribute("codelane.stop_reason", stop)
        span.set_attribute("codelane.model_requests", model_requests)
        span.set_attribute("codelane.tool_calls", tool_calls)
        if stop == "error":
            tracing.fail(span, "error", "the turn ended with an error")
        span.end()
        tracing.detach(self._token)
