"""Live delivery of stored events to subscribers.

Events are published only after the store has them (see `eventlog`), so the store, not a
subscriber's buffer, is what guarantees delivery. Each subscriber keeps a buffer of live events,
bounded in count and in size; one that falls further behind (a slow client, a fast turn, a client
that never reads) drops its buffer and reads what it missed from the store, page by page (off the
event loop: hundreds of followers reading theirs on it stalled every session), then goes on live.
Nobody is cut off for being slow, memory stays bounded, and every event arrives once, in order.

A subscription ends when its session is deleted (`SessionClosed`) or the server stops
(`admission.ShuttingDown`): it hands over the events it holds, reads no more from the store, and
raises. Whatever its reader missed is stored, for it to read after the last sequence it got. A
turn's own stream is the exception: it `reads_to_the_end` of the store before it raises, because
a stopping server ends its turns (TurnFinished stored) before it ends the subscriptions, and a
SendMessage stream that had fallen behind would otherwise end without the TurnFinished its client
waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Set
from typing import TYPE_CHECKING

from session_server.admission import ShuttingDown
from session_server.events import StoredEvent
from session_server.limits import string_chars
from session_server.store import EventPage
from tool_worker.telemetry import logs as log_context

if TYPE_CHECKING:
    from session_server.metrics import ServerMetrics

# Live events a subscriber holds before it switches to reading from the store.
SUBSCRIBER_BUFFER = 10_000
# The same bound in bytes (estimated, see `estimated_size`). Counting events alone let a client
# that opens streams and never reads them make the server hold 10,000 events per stream, and an
# event may carry a tool output of a megabyte. An event bigger than this on its own (rare: tool
# output is cut at 1 MiB) always comes from the store.
SUBSCRIBER_BUFFER_BYTES = 4 * 1024 * 1024
# What an event takes in memory besides the characters of its strings (its objects, numbers and
# their headers): 300-700 bytes by tracemalloc for a TextDelta or a small ToolCallFinished.
EVENT_OVERHEAD_BYTES = 512
# Most events handed over at once (a stream message carries one batch, or less when it is big).
BATCH_EVENTS = 500

# Reads a page of stored events after a sequence (`Store.event_page`: bounded in count and size),
# off the event loop: the loop serves the others meanwhile (see `Subscription.batches`).
Replay = Callable[[str, int], Awaitable[EventPage]]

log = logging.getLogger(__name__)


def estimated_size(event: StoredEvent) -> int:
    """Bytes an event holds in memory, roughly: its strings, which make a big event big, are
    counted without encoding them (a character as a byte: most of what tools and models write is
    ASCII)."""
    return EVENT_OVERHEAD_BYTES + string_chars(event.payload)


class SessionClosed(Exception):
    """The session was deleted while a subscriber watched it."""


_RESUME = ("reconnect, to another server or to this one once it restarts, and resume with WatchEvents "
           "after_sequence = the last sequence you received")


def _stopping(unstored: bool = False) -> ShuttingDown:
    if unstored:
        return ShuttingDown("the server is shutting down while its store cannot take writes: this event stream ends "
                            "here, and the session's last events, which could not be stored, are lost; its turn is "
                            "ended as interrupted (its unfinished calls cancelled) once a server restarts on a "
                            f"store that takes writes: {_RESUME}")
    return ShuttingDown(f"the server is shutting down: this event stream ends here, and nothing is lost (events are "
                        f"stored before they are sent): {_RESUME}")


class Subscription:
    """Events of one session with sequence > `cursor`, in order, each once."""

    def __init__(self, bus: EventBus, session_id: str, buffer: int, buffer_bytes: int, cursor: int,
                 reads_to_the_end: bool) -> None:
        self._bus = bus
        self.session_id = session_id
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        # Each queued event with its `estimated_size`, and their sum.
        self._queue: deque[tuple[StoredEvent, int]] = deque()
        self.queued_bytes = 0
        self._ready = asyncio.Event()
        # Sequence of the last event delivered.
        self.cursor = cursor
        # True when live events were dropped: the next ones come from the store.
        self._behind = False
        # What `batches` raises once it has handed over what it holds; None while it goes on.
        self._end: Exception | None = None
        # Whether, once ended, it still catches up from the store before raising (bounded: nothing
        # is published to an ended subscription, so the store's end stays where it is).
        self._reads_to_the_end = reads_to_the_end
        # Times this subscriber fell behind and caught up from the store (for tests and metrics).
        self.catch_ups = 0

    def _offer(self, events: list[tuple[StoredEvent, int]], size: int) -> None:
        """Queues `events` (each with its size; `size` is their sum), or falls behind."""
        if self._end is not None or self._behind:
            return
        if len(self._queue) + len(events) > self._buffer or self.queued_bytes + size > self._buffer_bytes:
            self._behind = True
            self._queue.clear()
            self.queued_bytes = 0
            if self._bus.metrics is not None:
                self._bus.metrics.subscriber_catch_ups.inc()
        else:
            self._queue.extend(events)
            self.queued_bytes += size
        self._ready.set()

    def _close(self, end: Exception) -> None:
        self._end = end
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
                if self._behind and (self._end is None or self._reads_to_the_end):
                    # Cleared before reading, so events published from now on, the read under way
                    # included, are queued again: every one of them was stored after the read was
                    # asked for, and the read sees all that was stored before. The overlap (those
                    # the read sees too) is skipped by sequence; should they pass the bounds, the
                    # next catch-up reads them.
                    self._behind = False
                    self.catch_ups += 1
                    while True:
                        page = await self._bus.replay(self.session_id, self.cursor)
                        fresh = [event for event in page.events if event.sequence > self.cursor]
                        for start in range(0, len(fresh), limit):
                            chunk = fresh[start : start + limit]
                            self.cursor = chunk[-1].sequence
                            self._delivered(len(chunk))
                            yield chunk
                        if not page.more or self._behind or (self._end is not None and not self._reads_to_the_end):
                            break
                    continue
                if self._queue:
                    batch = []
                    while self._queue and len(batch) < limit:
                        event, size = self._queue.popleft()
                        self.queued_bytes -= size
                        if event.sequence > self.cursor:
                            self.cursor = event.sequence
                            batch.append(event)
                    if batch:
                        self._delivered(len(batch))
                        yield batch
                    continue
                if self._end is not None:
                    raise self._end
                self._ready.clear()
                await self._ready.wait()
        finally:
            self.close()


class EventBus:
    """Subscribers by session. `await replay(session_id, after)` reads a page of stored events."""

    def __init__(self, replay: Replay, buffer: int = SUBSCRIBER_BUFFER,
                 buffer_bytes: int = SUBSCRIBER_BUFFER_BYTES, metrics: ServerMetrics | None = None) -> None:
        self.replay = replay
        self.metrics = metrics
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._stopped = False

    def subscribe(self, session_id: str, after: int, reads_to_the_end: bool = False) -> Subscription:
        """Live events of the session with sequence > `after` (the caller has seen up to it).
        `reads_to_the_end`: once ended, it still hands over what the store holds (see the module)."""
        subscription = Subscription(self, session_id, self._buffer, self._buffer_bytes, after, reads_to_the_end)
        if self._stopped:
            subscription._close(_stopping())
        else:
            self._subscribers[session_id].add(subscription)
        return subscription

    def subscribers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def publish_many(self, events: Iterable[StoredEvent]) -> None:
        by_session: dict[str, list[StoredEvent]] = {}
        for event in events:
            by_session.setdefault(event.session_id, []).append(event)
        for session_id, batch in by_session.items():
            subscribers = tuple(self._subscribers.get(session_id, ()))
            if not subscribers:
                continue
            # Sized once, whatever the number of subscribers.
            sized = [(event, estimated_size(event)) for event in batch]
            size = sum(event_size for _, event_size in sized)
            for subscription in subscribers:
                try:
                    subscription._offer(sized, size)
                except Exception:
                    # One subscriber's failure is its own: the others, and the turn, go on.
                    log.exception("delivering events to a subscriber of %s failed", session_id,
                                  extra=log_context.ids(session_id=session_id))

    def close_session(self, session_id: str) -> None:
        for subscription in self._subscribers.pop(session_id, set()):
            subscription._close(SessionClosed(session_id))

    def stop(self, unstored: Set[str] = frozenset()) -> None:
        """The server is stopping and no event will come: every subscription ends, and so does
        any made from now on (their streams end with a status saying so rather than being cut
        when the gRPC server stops). `unstored`: sessions whose last events could not be stored,
        whose streams are told so."""
        self._stopped = True
        subscribers, self._subscribers = self._subscribers, defaultdict(set)
        for session_id, subscriptions in subscribers.items():
            for subscription in subscriptions:
                subscription._close(_stopping(session_id in unstored))

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.session_id]
