"""Tool calls waiting for a person (or client) to approve them: the rendezvous between a turn's
call and ConfirmToolCall. Domain logic, no grpc.

A call registers itself, waits with its timeout, and always unregisters when it stops waiting
(answered, timed out or cancelled), so nothing outlives the wait.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class ConfirmationNotFound(LookupError):
    def __init__(self, session_id: str, call_id: str) -> None:
        super().__init__(
            f"no call {call_id!r} of session {session_id} waits for a confirmation: it was never asked, "
            "was already answered, timed out, or its turn was cancelled"
        )
        self.session_id = session_id
        self.call_id = call_id


@dataclass(frozen=True)
class Answer:
    approved: bool
    reason: str


class Confirmations:
    """The calls waiting for a confirmation, server-wide, by (session id, call id)."""

    def __init__(self) -> None:
        # One call per key: call ids are unique within a session (the agent makes one when a
        # model repeats an id).
        self._waiting: dict[tuple[str, str], asyncio.Future[Answer]] = {}

    async def wait(self, session_id: str, call_id: str, within: float) -> Answer | None:
        """Waits for `answer()`; None when `within` seconds pass first."""
        key = (session_id, call_id)
        if key in self._waiting:
            raise RuntimeError(f"call {call_id} of session {session_id} already waits for a confirmation")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            await asyncio.wait({future}, timeout=within)
            return future.result() if future.done() else None
        finally:
            del self._waiting[key]

    def answer(self, session_id: str, call_id: str, approved: bool, reason: str) -> None:
        """Raises ConfirmationNotFound when no such call waits."""
        future = self._waiting.get((session_id, call_id))
        if future is None or future.done():
            raise ConfirmationNotFound(session_id, call_id)
        future.set_result(Answer(approved, reason))

    def waiting(self, session_id: str) -> list[str]:
        """Ids of the calls of a session that wait for a confirmation."""
        return [call_id for sid, call_id in self._waiting if sid == session_id]
