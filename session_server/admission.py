"""Admission control: the limits an operator sets on new work, and how work over them is refused.

Domain logic, no grpc. Each limit counts something the server holds in memory or on its event
loop, and is checked where that thing is created, before anything changes:

| limit | counts | refused how |
| --- | --- | --- |
| max_sessions | sessions stored | CreateSession: `AtCapacity` (RESOURCE_EXHAUSTED) |
| max_running_turns | turns running, server-wide | SendMessage: `AtCapacity` |
| max_subscribers | WatchEvents streams open | WatchEvents: `AtCapacity` |
| max_pending_query_calls | Query calls not finished, server-wide | the call: an AT_CAPACITY error result |
| max_pending_query_calls_per_session | the same, per session | the call: an AT_CAPACITY error result |

A Query call over its limit is not an RPC: it is one call of a model response, so it gets what
every call that cannot run gets, an error result the model reads (saying which limit and what to
do), and the other calls of the response go on. Its turn is not failed: the model can retry the
call later or make fewer at once. A value of 0 means no limit.

Shutdown goes first: after `close()` nothing new is admitted (`ShuttingDown`), while what runs
finishes or is interrupted by the server; then the streams and long-polls still open end with
`ShuttingDown` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from session_server.metrics import ServerMetrics

DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_MAX_RUNNING_TURNS = 256
DEFAULT_MAX_SUBSCRIBERS = 1_000
DEFAULT_MAX_PENDING_QUERY_CALLS = 10_000
DEFAULT_MAX_PENDING_QUERY_CALLS_PER_SESSION = 256

# What a refusal tells the client to wait before trying again: a session slot frees only when
# someone deletes a session; turns and streams end on their own, usually within seconds.
RETRY_AFTER = {"max_sessions": 30.0, "max_running_turns": 2.0, "max_subscribers": 2.0}
# A stopping server: come back after its restart, or go to another one.
SHUTDOWN_RETRY_AFTER = 5.0


@dataclass(frozen=True)
class Limits:
    """The operator's limits (`codelane server --max-*`); 0 means unlimited."""

    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_running_turns: int = DEFAULT_MAX_RUNNING_TURNS
    max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS
    max_pending_query_calls: int = DEFAULT_MAX_PENDING_QUERY_CALLS
    max_pending_query_calls_per_session: int = DEFAULT_MAX_PENDING_QUERY_CALLS_PER_SESSION

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} is {value}: it must be 0 (no limit) or more")


class AtCapacity(Exception):
    """New work would go over `limit` (whose value is `value`); try again after `retry_after` s."""

    def __init__(self, limit: str, value: int, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping: it admits nothing new, and ends what would otherwise wait on
    (event streams that follow, claims that long-poll); the message says what to do instead."""

    def __init__(self, message: str = "the server is shutting down and takes no new work: retry on another "
                 "server or after it restarts") -> None:
        super().__init__(message)
        self.retry_after = SHUTDOWN_RETRY_AFTER


class Admission:
    """The counts behind the limits. One per server, used on the event loop's thread only."""

    def __init__(self, limits: Limits, *, sessions: int = 0, metrics: ServerMetrics | None = None) -> None:
        self.limits = limits
        self._metrics = metrics
        self.closed = False
        self.sessions = sessions
        self.running_turns = 0
        self.subscribers = 0
        self.pending_query_calls = 0
        self._pending_by_session: dict[str, int] = {}

    def close(self) -> None:
        """From now on nothing new is admitted."""
        self.closed = True

    def usage(self) -> dict[str, tuple[int, int]]:
        """Each limit's (count now, limit)."""
        limits = self.limits
        return {
            "max_sessions": (self.sessions, limits.max_sessions),
            "max_running_turns": (self.running_turns, limits.max_running_turns),
            "max_subscribers": (self.subscribers, limits.max_subscribers),
            "max_pending_query_calls": (self.pending_query_calls, limits.max_pending_query_calls),
            "max_pending_query_calls_per_session": (
                max(self._pending_by_session.values(), default=0), limits.max_pending_query_calls_per_session),
        }

    # -- sessions ------------------------------------------------------------------------------

    def check_session(self) -> None:
        """Raises unless one more session may be created (then call `session_added`)."""
        self.check_open()
        limit = self.limits.max_sessions
        if limit and self.sessions >= limit:
            self._refuse("max_sessions", limit, f"the server holds {self.sessions} sessions, its limit "
                         "(--max-sessions): delete sessions you no longer need, or retry later")

    def session_added(self) -> None:
        self.sessions += 1

    def session_removed(self) -> None:
        self.sessions = max(0, self.sessions - 1)

    # -- turns and subscribers -----------------------------------------------------------------

    def acquire_turn(self) -> None:
        """Counts a turn that starts; raises when none may (`release_turn` when it ends)."""
        self.check_open()
        limit = self.limits.max_running_turns
        if limit and self.running_turns >= limit:
            self._refuse("max_running_turns", limit, f"the server runs {self.running_turns} turns at once, its "
                         "limit (--max-running-turns): retry shortly")
        self.running_turns += 1

    def release_turn(self) -> None:
        self.running_turns = max(0, self.running_turns - 1)

    def acquire_subscriber(self) -> None:
        """Counts an event stream that opens; raises when none may (`release_subscriber` at its end)."""
        self.check_open()
        limit = self.limits.max_subscribers
        if limit and self.subscribers >= limit:
            self._refuse("max_subscribers", limit, f"the server has {self.subscribers} event streams open, its "
                         "limit (--max-subscribers): close streams you do not read, or retry shortly")
        self.subscribers += 1

    def release_subscriber(self) -> None:
        self.subscribers = max(0, self.subscribers - 1)

    # -- Query calls ---------------------------------------------------------------------------

    def admit_query_call(self, session_id: str) -> str | None:
        """Counts a Query call that will run; None when admitted (`release_query_call` when it
        ends), else why not, as the model should read it."""
        limits = self.limits
        mine = self._pending_by_session.get(session_id, 0)
        if limits.max_pending_query_calls_per_session and mine >= limits.max_pending_query_calls_per_session:
            self._count_refusal("max_pending_query_calls_per_session")
            return (f"this session already has {mine} Query calls pending, the server's limit per session "
                    "(--max-pending-query-calls-per-session); wait for their results, then make this call "
                    "again, with fewer calls at once")
        if limits.max_pending_query_calls and self.pending_query_calls >= limits.max_pending_query_calls:
            self._count_refusal("max_pending_query_calls")
            return (f"the server already has {self.pending_query_calls} Query calls pending across sessions, its "
                    "limit (--max-pending-query-calls); make this call again later")
        self._pending_by_session[session_id] = mine + 1
        self.pending_query_calls += 1
        return None

    def release_query_call(self, session_id: str) -> None:
        left = self._pending_by_session.get(session_id, 0) - 1
        if left > 0:
            self._pending_by_session[session_id] = left
        else:
            self._pending_by_session.pop(session_id, None)
        self.pending_query_calls = max(0, self.pending_query_calls - 1)

    # -- internals -----------------------------------------------------------------------------

    def check_open(self) -> None:
        """Raises ShuttingDown once the server stops admitting work."""
        if self.closed:
            raise ShuttingDown()

    def _count_refusal(self, limit: str) -> None:
        if self._metrics is not None:
            self._metrics.admission_refusals.labels(limit).inc()

    def _refuse(self, limit: str, value: int, message: str) -> None:
        self._count_refusal(limit)
        raise AtCapacity(limit, value, RETRY_AFTER[limit], message)
