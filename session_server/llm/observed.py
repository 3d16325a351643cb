"""Observing model requests: their metrics, and (tracing on) their `chat {model}` spans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from prometheus_client import Counter

from session_server import telemetry as attrs
from session_server.llm.base import ModelError, ModelProvider, ModelRequest, ModelResponse, StreamItem
from session_server.telemetry import Telemetry


class ObservedProvider:
    """Wraps a provider of one kind (openai, anthropic, scripted): each request counts by status
    (ok, cancelled, or its ModelError reason in lower case), and an ok one records its latency, its
    time to the first streamed item and its tokens. Tracing on, each request is a `chat {model}`
    span, a child of the current span (the turn's `invoke_agent`, in the turn's task).

    Wrap it in the Generate lane's limiter, not the other way round: the figures are the model's,
    not the wait for a free slot."""

    def __init__(self, provider: ModelProvider, kind: str, telemetry: Telemetry) -> None:
        self.provider = provider
        self._kind = kind
        self._telemetry = telemetry
        metrics = telemetry.metrics
        self._latency = metrics.model_latency.labels(kind)
        self._first_item = metrics.model_first_token.labels(kind)
        self._input_tokens = metrics.model_input_tokens.labels(kind)
        self._output_tokens = metrics.model_output_tokens.labels(kind)
        self._cached_tokens = metrics.model_cached_input_tokens.labels(kind)
        self._statuses: dict[str, Counter] = {}

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        tracing = self._telemetry.tracing
        span = None
        if tracing is not None:
            span = tracing.start(f"chat {request.model}", kind="client", attributes={
                attrs.OPERATION: "chat",
                attrs.PROVIDER: self._kind,
                attrs.REQUEST_MODEL: request.model,
                "gen_ai.request.max_tokens": request.max_tokens,
            })
        started = time.perf_counter()
        # Observed with the response only: a request that fails after its first item (an error
        # event mid-stream, a cut stream) or is cancelled is not one of the successful requests
        # this histogram counts (docs/deploy.md), and its count must match the duration's.
        first_item: float | None = None
        status = "error"
        try:
            async with aclosing(self.provider.stream(request)) as items:
                async for item in items:
                    if first_item is None:
                        first_item = time.perf_counter() - started
                    if isinstance(item, ModelResponse):
                        self._first_item.observe(first_item)
                        self._finished(item, time.perf_counter() - started, span)
                        status = "ok"
                    yield item
        except ModelError as exc:
            status = exc.reason.lower()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if status != "ok":  # a consumer may stop once it has the complete response
                status = "cancelled"
            raise
        finally:
            counter = self._statuses.get(status)
            if counter is None:
                counter = self._statuses[status] = self._telemetry.metrics.model_requests.labels(self._kind, status)
            counter.inc()
            if span is not None:
                if status != "ok":
                    tracing.fail(span, status, f"the model request ended: {status}")
                span.end()

    def _finished(self, response: ModelResponse, seconds: float, span) -> None:
        usage = response.usage
        self._latency.observe(seconds)
        self._input_tokens.inc(usage.input_tokens)
        self._output_tokens.inc(usage.output_tokens)
        self._cached_tokens.inc(usage.cached_input_tokens)
        if span is not None:
            span.set_attribute(attrs.INPUT_TOKENS, usage.input_tokens)
            span.set_attribute(attrs.OUTPUT_TOKENS, usage.output_tokens)
            span.set_attribute(attrs.FINISH_REASONS, [response.stop_reason])

    async def aclose(self) -> None:
        await self.provider.aclose()
