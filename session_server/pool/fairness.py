"""Fairness: calls waiting for a worker, one queue per session, served round-robin, so one
session's hundred greps cannot starve another session's two."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class _Queued(Protocol):
    @property
    def session_id(self) -> str: ...


T = TypeVar("T", bound=_Queued)


class FairQueues(Generic[T]):
    """Per-session FIFO queues; the order of sessions is the round-robin order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __iter__(self) -> Iterator[T]:
        for queue in list(self._queues.values()):
            yield from list(queue)

    def push(self, item: T) -> None:
        self._queues.setdefault(item.session_id, deque()).append(item)

    def push_first(self, item: T) -> None:
        """Ahead of everything: a retry has waited once already."""
        self._queues.setdefault(item.session_id, deque()).appendleft(item)
        self._queues.move_to_end(item.session_id, last=False)

    def remove(self, item: T) -> bool:
        queue = self._queues.get(item.session_id)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        if not queue:
            del self._queues[item.session_id]
        return True

    def serve(self, place: Callable[[T], bool], has_room: Callable[[], bool]) -> None:
        """Offers queued items to `place` (True: it took the item), one per session per round,
        while `has_room()`; each session that got one moves to the back."""
        progress = True
        while progress and self._queues and has_room():
            progress = False
            for session_id in list(self._queues):
                queue = self._queues[session_id]
                placed = next((item for item in queue if place(item)), None)
                if placed is not None:
                    queue.remove(placed)
                    progress = True
                if not queue:
                    del self._queues[session_id]
                elif placed is not None:
                    self._queues.move_to_end(session_id)
