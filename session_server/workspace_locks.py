"""Commands run alone on their workspace, across sessions.

A command (bash, execute: any call that does not say what it touches) may do anything to its
workspace while it runs, including swapping a directory for a symlink to somewhere else
(`rename(2)` with RENAME_EXCHANGE) between the moment another call checks a path and the moment it
opens it. Within one session the scheduler already orders such a call against every other call;
this lock does the same across sessions whose workspaces overlap (the same directory, or one
inside the other): a command waits for their running calls, and their calls wait for the command.
Calls that say what they touch (every Query call, write, edit, move, copy, delete) share the
workspace with each other, as before.

Waiters are served in arrival order among those that conflict, so a stream of reads from one
session cannot starve another session's command.

Domain logic: no grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


class WaitedTooLong(Exception):
    """A hold was not granted within the wait allowed; `what` says what held the workspace."""

    def __init__(self, what: str, within: float) -> None:
        super().__init__(f"waited {within:g}s for {what}")
        self.what, self.within = what, within


@dataclass(eq=False)
class _Hold:
    workspace: str
    alone: bool
    granted: asyncio.Future[None] | None = field(default=None, repr=False)

    def conflicts_with(self, other: _Hold) -> bool:
        return (self.alone or other.alone) and _overlap(self.workspace, other.workspace)


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class _Holding:
    """One call's hold, as an async context manager (a class: a generator-based one costs a few
    microseconds per call, on every call)."""

    __slots__ = ("_hold", "_locks", "_waiting", "_within")

    def __init__(self, locks: WorkspaceLocks, hold: _Hold, waiting: Callable[[str | None], None],
                 within: float) -> None:
        self._locks, self._hold, self._waiting, self._within = locks, hold, waiting, within

    async def __aenter__(self) -> None:
        await self._locks._acquire(self._hold, self._waiting, self._within)

    async def __aexit__(self, *exc_info: object) -> None:
        self._locks._release(self._hold)


class WorkspaceLocks:
    """Holds on workspaces (resolved paths) for one server. Single event loop; not thread-safe."""

    def __init__(self) -> None:
        self._held: list[_Hold] = []
        self._waiting: list[_Hold] = []

    def hold(self, workspace: str, *, alone: bool, within: float | None = None,
             waiting: Callable[[str | None], None] = lambda what: None) -> _Holding:
        """`async with locks.hold(...)`: holds `workspace` for one call, `alone` for a command and
        shared otherwise. If it must wait, `waiting` hears what for, then None once it holds it;
        after `within` seconds of waiting it raises WaitedTooLong instead (a call's own time limit:
        the other session's command may run for hours)."""
        return _Holding(self, _Hold(workspace, alone), waiting, within)

    async def _acquire(self, hold: _Hold, waiting: Callable[[str | None], None], within: float | None) -> None:
        if not self._blocked(hold, len(self._waiting)):
            self._held.append(hold)
            return
        hold.granted = asyncio.get_running_loop().create_future()
        self._waiting.append(hold)
        what = ("the calls of other sessions on its workspace to end" if hold.alone
                else "a command of another session on its workspace to end")
        waiting(what)
        try:
            # Only a call that must wait pays for the timer.
            async with asyncio.timeout(within):
                await hold.granted
        except (asyncio.CancelledError, TimeoutError) as exc:
            if hold in self._waiting:
                self._waiting.remove(hold)
            elif hold in self._held:
                self._held.remove(hold)  # granted in the same loop turn as the cancellation
            self._grant()
            if isinstance(exc, TimeoutError):
                assert within is not None
                raise WaitedTooLong(what, within) from None
            raise
        waiting(None)

    def _release(self, hold: _Hold) -> None:
        self._held.remove(hold)
        if self._waiting:
            self._grant()

    def _blocked(self, hold: _Hold, ahead: int) -> bool:
        """Whether a held call, or one of the first `ahead` waiters, conflicts with `hold`."""
        return any(hold.conflicts_with(other) for other in self._held) or any(
            hold.conflicts_with(other) for other in self._waiting[:ahead]
        )

    def _grant(self) -> None:
        index = 0
        while index < len(self._waiting):
            hold = self._waiting[index]
            assert hold.granted is not None
            if hold.granted.cancelled():
                del self._waiting[index]  # its task was cancelled and will not run it
                continue
            if self._blocked(hold, index):
                index += 1
                continue
            del self._waiting[index]
            self._held.append(hold)
            hold.granted.set_result(None)
