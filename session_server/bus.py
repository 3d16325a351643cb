"""Live delivery of stored events to subscribers, each with a bounded buffer.

Events are published only after the store has them, so a subscriber that falls behind loses
nothing: it is told it overflowed (and the client gets RESOURCE_EXHAUSTED), and resumes from
the last sequence it saw.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from session_server.events import StoredEvent

# Events a subscriber may lag behind before it is cut off.
SUBSCRIBER_BUFFER = 10_000


class SubscriberOverflow(Exception):
    """The subscriber fell more than its buffer behind; resume from `last_sequence`."""

    def __init__(self, last_sequence: int) -> None:
        super().__init__(f"subscriber fell behind; resume after sequence {last_sequence}")
        self.last_sequence = last_sequence


class SessionClosed(Exception):
    """The session was deleted while a subscriber watched it."""


_CLOSED = object()


class Subscription:
    def __init__(self, bus: EventBus, session_id: str, buffer: int) -> None:
        self._bus = bus
        self.session_id = session_id
        self._queue: asyncio.Queue[object] = asyncio.Queue(buffer + 1)
        self._buffer = buffer
        self.last_sequence = 0
        self.overflowed = False

    def _offer(self, event: object) -> None:
        if self.overflowed:
            return
        if self._queue.qsize() >= self._buffer and event is not _CLOSED:
            self.overflowed = True
            self._queue.put_nowait(_CLOSED)
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._bus._remove(self)

    async def __aiter__(self) -> AsyncIterator[StoredEvent]:
        try:
            while True:
                item = await self._queue.get()
                if item is _CLOSED:
                    if self.overflowed:
                        raise SubscriberOverflow(self.last_sequence)
                    raise SessionClosed(self.session_id)
                assert isinstance(item, StoredEvent)
                self.last_sequence = item.sequence
                yield item
        finally:
            self.close()


class EventBus:
    def __init__(self, buffer: int = SUBSCRIBER_BUFFER) -> None:
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._buffer = buffer

    def subscribe(self, session_id: str) -> Subscription:
        subscription = Subscription(self, session_id, self._buffer)
        self._subscribers[session_id].add(subscription)
        return subscription

    def publish(self, event: StoredEvent) -> None:
        for subscription in tuple(self._subscribers.get(event.session_id, ())):
            subscription._offer(event)

    def close_session(self, session_id: str) -> None:
        for subscription in self._subscribers.pop(session_id, set()):
            subscription._offer(_CLOSED)

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]
