"""The hub's side of one worker stream, with a transport whose writes the test lets through."""

from __future__ import annotations

import asyncio

from session_server.api.hub import _StreamLink
from session_server.pool.types import Assignment


class HeldWrites:
    """A Connect context whose writes wait until the test releases them."""

    def __init__(self) -> None:
        self.written: list = []
        self.release = asyncio.Event()
        self.wrote = asyncio.Condition()

    async def write(self, message) -> None:
        await self.release.wait()
        async with self.wrote:
            self.written.append(message)
            self.wrote.notify_all()

    async def sent(self, dispatch_id: str) -> None:
        async with self.wrote:
            await self.wrote.wait_for(
                lambda: any(a.dispatch_id == dispatch_id for m in self.written for a in m.assignments.assigns))


def assignment(dispatch_id: str) -> Assignment:
    return Assignment(dispatch_id=dispatch_id, call_id=dispatch_id, attempt=1, tool_name="read",
                      arguments_json="{}", workspace="/ws", session_id="s1", deadline=0.0)


async def test_a_flush_cancelled_mid_write_leaves_what_was_queued_behind_it_to_the_writer() -> None:
    # The dispatch whose call was cancelled held the write lock; the Assign queued meanwhile had
    # its own flush return at once (the holder writes everything), and was never sent.
    link = _StreamLink(write_timeout=60.0)
    context = HeldWrites()
    link.bind(context)  # type: ignore[arg-type]
    writer = asyncio.create_task(link.write_until_closed())
    link.assign(assignment("d1"))
    first = asyncio.create_task(link.flush())
    await asyncio.sleep(0)  # the first flush now writes d1
    link.assign(assignment("d2"))
    await link.flush()  # returns at once: the lock is held
    # Loop turns, not time: until the writer has woken for d2 and found the lock held.
    while link._kick_scheduled or link._wake.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    context.release.set()
    try:
        await asyncio.wait_for(context.sent("d2"), 10)
    finally:
        link.close("test over")
        await asyncio.wait_for(writer, 10)

