"""The hub's side of one worker stream, with a transport whose writes the test lets through."""

from __future__ import annotations

import asyncio

from session_server.api.hub import _StreamLink
from session_server.pool.types import Assignment, LinkFault


class HeldWrites:
    """A Connect context whose writes wait until the test releases them, and which records how
    many were in flight at once (grpc takes one at a time: a second fails TOO_MANY_OPERATIONS)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.written: list = []
        self.release = asyncio.Event()
        self.wrote = asyncio.Condition()
        self.in_flight = self.most_in_flight = 0
        self.fail = fail

    async def write(self, message) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if self.fail is not None:
                raise self.fail
            async with self.wrote:
                self.written.append(message)
                self.wrote.notify_all()
        finally:
            self.in_flight -= 1

    async def sent(self, count: int) -> None:
        async with self.wrote:
            await self.wrote.wait_for(lambda: len(self.written) >= count)

    def sequence(self) -> list[str]:
        """What went out, message by message: "assign d1 d2", "cancel d1"..."""
        shown = []
        for message in self.written:
            kind = message.WhichOneof("message")
            if kind == "assignments":
                shown.append(" ".join(["assign", *(a.dispatch_id for a in message.assignments.assigns)]))
            elif kind == "cancel":
                shown.append(f"cancel {message.cancel.dispatch_id}".strip())
            else:
                shown.append(kind)
        return shown


def assignment(dispatch_id: str) -> Assignment:
    return Assignment(dispatch_id=dispatch_id, call_id=dispatch_id, attempt=1, tool_name="read",
                      arguments_json="{}", workspace="/ws", session_id="s1", deadline=0.0)


async def started(link: _StreamLink, context: HeldWrites) -> asyncio.Task[None]:
    link.bind(context)  # type: ignore[arg-type]
    return asyncio.create_task(link.write_until_closed())


async def until_writing(context: HeldWrites) -> None:
    while context.in_flight == 0:  # noqa: ASYNC110 - loop turns, not time
        await asyncio.sleep(0)


async def test_what_is_queued_during_a_write_goes_next_in_order_and_one_write_at_a_time() -> None:
    # A Cancel queued while its Assign is being written never overtakes it; Assigns queued
    # meanwhile share one message, ahead of the Cancel; the stream never has two writes at once.
    link = _StreamLink(write_timeout=60.0)
    context = HeldWrites()
    writer = await started(link, context)
    link.assign(assignment("d1"))
    await until_writing(context)
    link.cancel(assignment("d1"), "withdrawn")
    link.assign(assignment("d2"))
    link.assign(assignment("d3"))
    link.drain("bye")
    context.release.set()
    await asyncio.wait_for(context.sent(4), 10)
    link.close("test over")
    await asyncio.wait_for(writer, 10)
    assert context.sequence() == ["assign d1", "assign d2 d3", "cancel d1", "drain"]
    assert context.most_in_flight == 1


async def test_what_was_queued_before_the_stream_was_bound_goes_first() -> None:
    # Calls assigned between the worker's registration and its Welcome wait for the stream.
    link = _StreamLink(write_timeout=60.0)
    link.assign(assignment("d1"))
    context = HeldWrites()
    context.release.set()
    writer = await started(link, context)
    await asyncio.wait_for(context.sent(1), 10)
    link.close("test over")
    await asyncio.wait_for(writer, 10)
    assert context.sequence() == ["assign d1"]


async def test_a_write_that_never_completes_closes_the_link_as_a_heartbeat_timeout() -> None:
    # A worker that reads nothing fills the window: its writes wait for ever unless bounded.
    link = _StreamLink(write_timeout=0.01)
    context = HeldWrites()  # never released
    writer = await started(link, context)
    link.assign(assignment("d1"))
    await asyncio.wait_for(writer, 10)
    assert link.fault is LinkFault.HEARTBEAT_TIMEOUT
    assert "did not complete in 0.01s" in link.closed_reason


async def test_a_failed_write_closes_the_link_and_answers_a_waiting_probe() -> None:
    link = _StreamLink(write_timeout=60.0)
    context = HeldWrites(fail=RuntimeError("transport gone"))
    writer = await started(link, context)
    probe = asyncio.create_task(link.carries_writes(60.0))
    await until_writing(context)
    context.release.set()
    assert await asyncio.wait_for(probe, 10) is False  # at once, not after its 60 s
    await asyncio.wait_for(writer, 10)
    assert link.closed_reason == "writing to the worker failed: transport gone"
    assert link.fault is None


async def test_a_probe_says_whether_its_message_reached_the_stream() -> None:
    link = _StreamLink(write_timeout=60.0)
    context = HeldWrites()
    writer = await started(link, context)
    # Held: the probe gives up after its own bound, and its write still goes out later.
    assert await link.carries_writes(0.01) is False
    context.release.set()
    await asyncio.wait_for(context.sent(1), 10)
    assert await asyncio.wait_for(link.carries_writes(60.0), 10) is True
    assert context.sequence() == ["cancel", "cancel"]  # the Cancel of no call that workers ignore
    link.close("test over")
    await asyncio.wait_for(writer, 10)
    assert await link.carries_writes(60.0) is False  # a closed link carries nothing
