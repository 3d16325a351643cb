"""The Generate lane: a server-wide cap on concurrent model requests, shared by all sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from session_server.llm.base import ModelProvider, ModelRequest, StreamItem


class LimitedProvider:
    """Wraps a provider so that at most the semaphore's value of streams run at once, across every
    provider sharing the semaphore. A slot is held from the request until the stream ends or is
    closed; consume streams inside `contextlib.aclosing` so an abandoned one frees its slot."""

    def __init__(self, provider: ModelProvider, semaphore: asyncio.Semaphore) -> None:
        self.provider = provider
        self._semaphore = semaphore

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        async with self._semaphore, aclosing(self.provider.stream(request)) as items:
            async for item in items:
                yield item

    async def aclose(self) -> None:
        await self.provider.aclose()
