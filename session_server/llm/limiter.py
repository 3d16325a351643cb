"""The Generate lane: a server-wide cap on concurrent model requests, shared by all sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from session_server.llm.base import ModelProvider, ModelRequest, ModelResponse, StreamItem
from session_server.stats import LaneStats, StatsLane


class LimitedProvider:
    """Wraps a provider so that at most the semaphore's value of streams run at once, across every
    provider sharing the semaphore. A slot is held from the request until the stream ends or is
    closed; consume streams inside `contextlib.aclosing` so an abandoned one frees its slot.

    With `stats`, it keeps the Generate lane's figures (AdminService.GetQueueStats): only it knows
    when a request gets its slot, so a request counts as pending while it waits for one and as
    active while it holds one (counted active from the start, requests queued behind the limit
    looked as if they ran)."""

    def __init__(self, provider: ModelProvider, semaphore: asyncio.Semaphore, stats: LaneStats | None = None) -> None:
        self.provider = provider
        self._semaphore = semaphore
        self._stats = stats

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        stats = self._stats
        if stats is None:
            async with self._semaphore, aclosing(self.provider.stream(request)) as items:
                async for item in items:
                    yield item
            return
        loop = asyncio.get_running_loop()
        enqueued = loop.time()
        stats.enqueued(StatsLane.GENERATE)
        admitted = responded = ok = False
        try:
            async with self._semaphore:
                admitted = True
                stats.started(StatsLane.GENERATE)
                async with aclosing(self.provider.stream(request)) as items:
                    async for item in items:
                        responded = responded or isinstance(item, ModelResponse)
                        yield item
                # Whole: its stream ended after its response (a consumer that stopped reading
                # before the end had something wrong with it).
                ok = responded
        finally:
            if admitted:
                stats.finished(StatsLane.GENERATE, ok, loop.time() - enqueued)
            else:
                stats.withdrawn(StatsLane.GENERATE)

    async def aclose(self) -> None:
        await self.provider.aclose()
