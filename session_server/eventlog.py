"""The session event log: every event is given its sequence at once, stored, and only then sent.

Group commit: events appended during one event-loop turn are written in one SQLite transaction at
the end of that turn, then handed to the live subscribers together. A turn's dozens of events per
tool call cost one commit instead of dozens, and nothing is ever sent that is not stored, so
whatever a client saw can be replayed and whatever it missed is there.

Sequences are assigned in memory when an event is appended (continuing the session's stored last
sequence), so `append` is cheap and never blocks; they are gap-free per session and the store
keeps them. If a commit fails (disk full, I/O error), the batch is kept and retried, and nothing
of it is sent until it is stored. Meanwhile `commit_failure` tells which sessions have events
waiting: their turns are not over (the commit that stores a TurnFinished marks its session idle,
see `store.Store.append_events`), and no turn may start over them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from session_server.bus import EventBus
from session_server.events import EventPayload, StoredEvent
from session_server.store import Store

if TYPE_CHECKING:
    from session_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Sessions whose next sequence is remembered; others read it from the store when they next emit.
MAX_REMEMBERED_SESSIONS = 10_000
# Wait before retrying a batch whose commit failed.
RETRY_DELAY = 0.5


class EventLog:
    """Appends session events with group commit. Single event loop; not thread-safe.

    `on_store_state(ok, why)` hears when commits start failing and when they succeed again (the
    server is not ready to take work meanwhile)."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        metrics: ServerMetrics | None = None,
        on_store_state: Callable[[bool, str], None] | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._metrics = metrics
        self._on_store_state = on_store_state
        self._pending: list[StoredEvent] = []
        self._last: OrderedDict[str, int] = OrderedDict()
        # The flush at the end of this loop turn, or the retry of a failed commit.
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        # What the last commit raised, while none has succeeded since (reported to on_store_state).
        self._failure: Exception | None = None
        # Sessions with events waiting for that retry.
        self._unstored: set[str] = set()

    def append(self, session_id: str, turn_id: str, payload: EventPayload) -> StoredEvent:
        """Gives the event its sequence; it is stored and sent at the end of this loop turn.
        Raises store.UnknownSession for a session that does not exist."""
        sequence = self._next_sequence(session_id)
        event = StoredEvent(session_id, sequence, time.time(), turn_id, payload)
        self._pending.append(event)
        if self._failure is not None:
            self._unstored.add(session_id)
        # While commits fail, the handle is the retry's (a retry that found nothing left, all of
        # it forgotten with deleted sessions, scheduled none: this event tries again at once).
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return event

    def commit_failure(self, session_id: str) -> Exception | None:
        """Why the session's events wait unstored (what the last commit raised; they are retried
        every RETRY_DELAY seconds), or None when they are stored or will be at the end of this
        loop turn."""
        return self._failure if session_id in self._unstored else None

    def last_assigned(self, session_id: str) -> int:
        """The session's last sequence given out, stored yet or not."""
        last = self._last.get(session_id)
        return last if last is not None else self._store.last_sequence(session_id)

    def flush(self) -> None:
        """Stores and sends what is pending now (at shutdown, and where a caller must read the
        store right after appending)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush()

    def forget(self, session_id: str) -> None:
        """The session is being deleted: its pending events are dropped, its counter forgotten."""
        self._pending = [e for e in self._pending if e.session_id != session_id]
        self._last.pop(session_id, None)
        self._unstored.discard(session_id)

    def close(self) -> dict[str, int]:
        """The server stops (after a last `flush`): no more retries. Returns how many events of
        each session could not be stored; they are dropped."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        lost = Counter(event.session_id for event in self._pending)
        self._pending = []
        self._unstored.clear()
        return dict(lost)

    def _next_sequence(self, session_id: str) -> int:
        last = self._last.get(session_id)
        if last is None:
            last = self._store.last_sequence(session_id)
        else:
            self._last.move_to_end(session_id)
        self._last[session_id] = last + 1
        if len(self._last) > MAX_REMEMBERED_SESSIONS:
            pending = {e.session_id for e in self._pending}
            for old in list(self._last):
                if len(self._last) <= MAX_REMEMBERED_SESSIONS:
                    break
                if old not in pending:
                    del self._last[old]
        return last + 1

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            gone = self._store.append_events(batch)
        except Exception as exc:
            if self._failure is None:  # once per outage, not at every retry
                log.exception("storing %d events failed; retrying every %gs (none is sent until stored)",
                              len(batch), RETRY_DELAY)
            self._pending = batch + self._pending
            self._failure = exc
            self._unstored.update(event.session_id for event in batch)
            self._flush_handle = asyncio.get_running_loop().call_later(RETRY_DELAY, self._flush)
            if self._metrics is not None:
                self._metrics.event_commit_failures.inc()
            self._report(False, f"storing events failed: {exc}")
            return
        if gone:
            # Their sessions were deleted before the commit: the store dropped them.
            for session_id in gone:
                self._last.pop(session_id, None)
            batch = [e for e in batch if e.session_id not in gone]
        if self._metrics is not None:
            self._metrics.event_commits.inc()
            self._metrics.events_appended.inc(len(batch))
        if self._failure is not None:
            # Cleared here, whoever flushed: a `flush()` that stored what the retry waited for
            # must leave appends scheduling their own flush again.
            self._failure = None
            self._unstored.clear()
            log.warning("storing events works again: %d stored", len(batch))
            self._report(True, "")
        self._bus.publish_many(batch)

    def _report(self, ok: bool, why: str) -> None:
        if self._on_store_state is not None:
            try:
                self._on_store_state(ok, why)
            except Exception:
                log.exception("reporting the store's state failed")
