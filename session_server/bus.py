"""Live delivery of stored events to subscribers.

Events are published only after the store has them (see `eventlog`), so the store, not a
subscriber's buffer, is what guarantees delivery. Each subscriber keeps a bounded buffer of live
events; one that falls further behind (a slow client, a fast turn) drops its buffer and reads
what it missed from the store, page by page, then goes on live. Nobody is cut off for being
slow, memory stays bounded, and every event arrives once, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

from session_server.events import StoredEvent

if TYPE_CHECKING:
    from session_server.metrics import ServerMetrics

# Live events a subscriber holds before it switches to reading from the store.
SUBSCRIBER_BUFFER = 10_000
# Events read from the store at a time by a subscriber catching up.
REPLAY_PAGE = 500
# Most events handed over at once (a stream message carries one batch, or less when it is big).
BATCH_EVENTS = 500

Replay = Callable[[str, int, int], list[StoredEvent]]

log = logging.getLogger(__name__)


class SessionClosed(Exception):
    """The session was deleted while a subscriber watched it."""


class Subscription:
    """Events of one session with sequence > `cursor`, in order, each once."""

    def __init__(self, bus: EventBus, session_id: str, buffer: int, cursor: int) -> None:
        self._bus = bus
        self.session_id = session_id
        self._buffer = buffer
        self._queue: deque[StoredEvent] = deque()
        self._ready = asyncio.Event()
        # Sequence of the last event delivered.
        self.cursor = cursor
        # True when live events were dropped: the next ones come from the store.
        self._behind = False
        self._closed = False
        # Times this subscriber fell behind and caught up from the store (for tests and metrics).
        self.catch_ups = 0

    def _offer(self, events: list[StoredEvent]) -> None:
        if self._closed or self._behind:
            return
        if len(self._queue) + len(events) > self._buffer:
            self._behind = True
            self._queue.clear()
            if self._bus.metrics is not None:
                self._bus.metrics.subscriber_catch_ups.inc()
        else:
            self._queue.extend(events)
        self._ready.set()

    def _close(self) -> None:
        self._closed = True
        self._ready.set()

    def _delivered(self, count: int) -> None:
        if self._bus.metrics is not None:
            self._bus.metrics.events_delivered.inc(count)

    def close(self) -> None:
        self._bus._remove(self)

    async def batches(self, limit: int = BATCH_EVENTS) -> AsyncIterator[list[StoredEvent]]:
        """The events, in order, as lists of at most `limit`: whatever is ready goes together,
        and a lone event goes at once."""
        try:
            while True:
                if self._behind:
                    # Cleared before reading, so events published from now on are queued again
                    # (the overlap with the store is skipped by sequence).
                    self._behind = False
                    self.catch_ups += 1
                    while True:
                        page = self._bus.replay(self.session_id, self.cursor, REPLAY_PAGE)
                        fresh = [event for event in page if event.sequence > self.cursor]
                        for start in range(0, len(fresh), limit):
                            chunk = fresh[start : start + limit]
                            self.cursor = chunk[-1].sequence
                            self._delivered(len(chunk))
                            yield chunk
                        if len(page) < REPLAY_PAGE or self._behind:
                            break
                    continue
                if self._queue:
                    batch = []
                    while self._queue and len(batch) < limit:
                        event = self._queue.popleft()
                        if event.sequence > self.cursor:
                            self.cursor = event.sequence
                            batch.append(event)
                    if batch:
                        self._delivered(len(batch))
                        yield batch
                    continue
                if self._closed:
                    raise SessionClosed(self.session_id)
                self._ready.clear()
                await self._ready.wait()
        finally:
            self.close()


class EventBus:
    """Subscribers by session. `replay(session_id, after, limit)` reads stored events."""

    def __init__(self, replay: Replay, buffer: int = SUBSCRIBER_BUFFER, metrics: ServerMetrics | None = None) -> None:
        self.replay = replay
        self.metrics = metrics
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._buffer = buffer

    def subscribe(self, session_id: str, after: int) -> Subscription:
        """Live events of the session with sequence > `after` (the caller has seen up to it)."""
        subscription = Subscription(self, session_id, self._buffer, after)
        self._subscribers[session_id].add(subscription)
        return subscription

    def subscribers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def publish_many(self, events: Iterable[StoredEvent]) -> None:
        by_session: dict[str, list[StoredEvent]] = {}
        for event in events:
            by_session.setdefault(event.session_id, []).append(event)
        for session_id, batch in by_session.items():
            for subscription in tuple(self._subscribers.get(session_id, ())):
                try:
                    subscription._offer(batch)
                except Exception:
                    # One subscriber's failure is its own: the others, and the turn, go on.
                    log.exception("delivering events to a subscriber of %s failed", session_id)

    def close_session(self, session_id: str) -> None:
        for subscription in self._subscribers.pop(session_id, set()):
            subscription._close()

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]
