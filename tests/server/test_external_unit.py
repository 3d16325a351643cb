"""External tasks and confirmations without a server: leases, re-offers, deadlines, cancellation,
long-polls, and that nothing is left behind in any structure. The board runs on manual time:
leases, deadlines and long-polls end when a test advances it, never on the machine's clock."""

from __future__ import annotations

import asyncio

import pytest

from session_server.admission import ShuttingDown
from session_server.calls import ToolCall
from session_server.confirmations import Answer, ConfirmationNotFound, Confirmations
from session_server.events import (
    CallInfo,
    EventPayload,
    ExternalTaskCompleted,
    ExternalTaskPending,
    ToolCallStarted,
)
from session_server.external import ExternalTasks, LeaseNotHeld, TaskNotFound
from tests.manual_time import ManualTime
from tests.polling import poll_until
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

CALL = CallInfo("c1", "bash", '{"command": "ls"}', "execute", 0)
BOUND = 5.0  # bound on every wait in these tests: a hang fails instead of blocking


class _Events(list[EventPayload]):
    """The events a board emitted; `offered` is set by the first ExternalTaskPending."""

    def __init__(self) -> None:
        super().__init__()
        self.offered = asyncio.Event()

    def append(self, event: EventPayload) -> None:
        super().append(event)
        if isinstance(event, ExternalTaskPending):
            self.offered.set()


def _owner(events: _Events) -> ToolCall:
    """The call's owner, which reports each claim as a ToolCallStarted into `events`."""
    return ToolCall(CALL, events.append, spec=ToolSpec("bash", "", {}, Lane.EXECUTE, False))


class _Board(ExternalTasks):
    """A board on its own manual time."""

    def __init__(self) -> None:
        self.time = ManualTime()
        super().__init__(clock=self.time.now, timers=self.time)


def _board() -> tuple[_Board, _Events]:
    return _Board(), _Events()


def _empty(board: _Board) -> bool:
    return len(board) == 0 and not board._by_session and not board._waiters and board.time.pending() == 0


async def _long_polling(board: ExternalTasks, session_id: str) -> None:
    """Until a claim of the session waits for a task (a state with no event; checked every turn
    of the loop, so the claim has done nothing else meanwhile)."""
    await poll_until(lambda: board._waiters.get(session_id), what="a long-polling claim", interval=0)


async def _offered(events: _Events) -> None:
    await asyncio.wait_for(events.offered.wait(), BOUND)


async def test_claim_and_complete() -> None:
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    [task] = await board.claim("s1", "client-a", 5, 30.0, 0.0)
    assert task.attempt == 1 and task.call == CALL
    assert task.lease_expire_time == board.time.now() + 30.0 and task.deadline == board.time.now() + 10.0
    assert await board.claim("s1", "client-b", 1, 30.0, 0.0) == []  # leased: not offered twice
    board.complete("s1", task.task_id, "client-a", ToolResult("done", exit_code=0, queue_wait=9.0))
    outcome = await asyncio.wait_for(run, BOUND)
    assert outcome.output == "done"
    assert outcome.worker_id == "client-a"
    assert outcome.queue_wait == 0.0  # the client cannot know our queue
    assert [type(e) for e in events] == [ExternalTaskPending, ToolCallStarted, ExternalTaskCompleted]
    assert isinstance(events[2], ExternalTaskCompleted) and events[2].client_id == "client-a"
    assert _empty(board)
    with pytest.raises(TaskNotFound):
        board.complete("s1", task.task_id, "client-a", ToolResult("again"))


async def test_complete_checks_session_and_lease_holder() -> None:
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    task_id = board.pending("s1")[0].task_id
    with pytest.raises(LeaseNotHeld, match="not claimed"):
        board.complete("s1", task_id, "client-a", ToolResult("x"))
    await board.claim("s1", "client-a", 1, 30.0, 0.0)
    with pytest.raises(TaskNotFound):
        board.complete("s2", task_id, "client-a", ToolResult("x"))
    with pytest.raises(LeaseNotHeld, match="another client"):
        board.complete("s1", task_id, "client-b", ToolResult("x"))
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert _empty(board)


async def test_expired_lease_reoffers_with_the_next_attempt() -> None:
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    [first] = await board.claim("s1", "client-a", 1, 5.0, 0.0)
    claim = asyncio.create_task(board.claim("s1", "client-b", 1, 30.0, 60.0))
    await _long_polling(board, "s1")
    board.time.advance(4.9)
    assert board.pending("s1")[0].attempt == 1 and not claim.done()
    board.time.advance(0.1)  # the lease expires: the task is offered again, to the waiting claim
    [second] = await asyncio.wait_for(claim, BOUND)
    assert second.task_id == first.task_id and second.attempt == 2
    with pytest.raises(LeaseNotHeld):
        board.complete("s1", first.task_id, "client-a", ToolResult("late"))
    board.complete("s1", second.task_id, "client-b", ToolResult("ok"))
    outcome = await asyncio.wait_for(run, BOUND)
    assert outcome.attempt == 2 and outcome.worker_id == "client-b"
    pendings = [e for e in events if isinstance(e, ExternalTaskPending)]
    assert [p.task.attempt for p in pendings] == [1, 2]
    assert _empty(board)


async def test_deadline_ends_the_task_with_a_timeout() -> None:
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 90.0, events.append, _owner(events)))
    await _offered(events)
    await board.claim("s1", "client-a", 1, 60.0, 0.0)  # claimed, renewed, never completed
    board.time.advance(59.0)
    board.renew("s1", board.pending("s1")[0].task_id, "client-a", 60.0)
    board.time.advance(30.9)
    assert not run.done() and len(board) == 1
    board.time.advance(0.1)  # 90 s after the offer, whatever the lease says
    outcome = await asyncio.wait_for(run, BOUND)
    assert outcome.error_kind is ErrorKind.TIMEOUT
    assert "within 90s" in outcome.output and "external_task_timeout" in outcome.output
    completed = events[-1]
    assert isinstance(completed, ExternalTaskCompleted) and completed.client_id == ""
    assert _empty(board)


async def test_a_timeout_says_whether_a_client_held_the_task_or_none_claimed_it() -> None:
    # A task its client held at the deadline (its handler ran too long) was told "check that a
    # client claims this session's tasks", which sent the reader after a client that did claim it.
    board, events = _board()
    held = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    await board.claim("s1", "client-a", 1, 60.0, 0.0)
    board.time.advance(10.0)
    outcome = await asyncio.wait_for(held, BOUND)
    assert outcome.error_kind is ErrorKind.TIMEOUT
    assert "client-a" in outcome.output and "within 10s" in outcome.output, outcome.output
    assert "check that a client claims" not in outcome.output
    assert "external_task_timeout" in outcome.output

    board, events = _board()
    expired = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    await board.claim("s1", "client-a", 1, 2.0, 0.0)
    board.time.advance(10.0)  # the lease expired at 2 s, and nobody claimed the task again
    outcome = await asyncio.wait_for(expired, BOUND)
    assert "lease expired" in outcome.output and "client-a" not in outcome.output, outcome.output

    board, events = _board()
    unclaimed = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    board.time.advance(10.0)
    outcome = await asyncio.wait_for(unclaimed, BOUND)
    assert "check that a client claims" in outcome.output, outcome.output
    assert _empty(board)


async def test_cancelling_the_call_withdraws_the_task() -> None:
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert _empty(board)
    completed = events[-1]
    assert isinstance(completed, ExternalTaskCompleted)
    assert completed.result.error_kind is ErrorKind.CANCELLED
    assert await board.claim("s1", "client-a", 1, 30.0, 0.0) == []


async def test_a_task_completed_in_the_loop_turn_its_call_is_cancelled_gives_the_clients_result() -> None:
    # CompleteExternalTask and CancelTurn handled in one loop turn: the client was told its result
    # was taken (and its command ran), so that is the call's result, not CANCELLED.
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    await _offered(events)
    [task] = await board.claim("s1", "client-a", 1, 30.0, 0.0)
    board.complete("s1", task.task_id, "client-a", ToolResult("ran it", exit_code=0))
    run.cancel()
    outcome = await asyncio.wait_for(run, BOUND)
    assert (outcome.output, outcome.worker_id) == ("ran it", "client-a")
    [completed] = [e for e in events if isinstance(e, ExternalTaskCompleted)]
    assert completed.result.output == "ran it" and completed.client_id == "client-a"
    assert _empty(board)


async def test_a_lease_is_held_until_its_timer_ends_it_whatever_the_wall_clock_does() -> None:
    # The clock moves 2 minutes on and the lease's timer has not run (a wall clock stepped
    # forward; the loop's timers run on a monotonic one): the holder still holds the task. It was
    # told its lease had expired, while nobody else could claim the task either.
    board, events = _board()
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 600.0, events.append, _owner(events)))
    await _offered(events)
    [task] = await board.claim("s1", "client-a", 1, 30.0, 0.0)
    board.time.current += 120.0  # the clock alone: no timer runs
    board.renew("s1", task.task_id, "client-a", 30.0)
    board.complete("s1", task.task_id, "client-a", ToolResult("done"))
    assert (await asyncio.wait_for(run, BOUND)).output == "done"
    assert _empty(board)


async def test_long_poll_wakes_on_offer_and_on_close() -> None:
    board, events = _board()
    claim = asyncio.create_task(board.claim("s1", "client-a", 1, 30.0, 60.0))
    await _long_polling(board, "s1")
    run = asyncio.create_task(board.run("s1", CALL, "/ws", 10.0, events.append, _owner(events)))
    [task] = await asyncio.wait_for(claim, BOUND)
    assert task.call == CALL
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)

    claim = asyncio.create_task(board.claim("s1", "client-a", 1, 30.0, 60.0))
    await _long_polling(board, "s1")
    board.close_session("s1")
    assert await asyncio.wait_for(claim, BOUND) == []
    assert _empty(board)


async def test_a_stopping_server_ends_the_long_polls_saying_so() -> None:
    board, _ = _board()
    claims = [asyncio.create_task(board.claim(session, "client-a", 1, 30.0, 60.0)) for session in ("s1", "s2")]
    await _long_polling(board, "s1")
    await _long_polling(board, "s2")
    board.stop()
    for claim in claims:
        with pytest.raises(ShuttingDown, match="claim again"):
            await asyncio.wait_for(claim, BOUND)
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(board.claim("s1", "client-a", 1, 30.0, 60.0), BOUND)  # would wait: ends at once
    assert await board.claim("s1", "client-a", 1, 30.0, 0.0) == []  # no wait: answered as ever
    assert _empty(board)


async def test_long_poll_gives_up_after_wait() -> None:
    board, _ = _board()
    claim = asyncio.create_task(board.claim("s1", "client-a", 1, 30.0, 20.0))
    await _long_polling(board, "s1")
    board.time.advance(19.9)
    assert not claim.done()
    board.time.advance(0.1)
    assert await asyncio.wait_for(claim, BOUND) == []
    assert _empty(board)
    assert await board.claim("s1", "client-a", 1, 30.0, 0.0) == []  # no wait: answers at once


async def test_mirror_announces_and_runs() -> None:
    board, events = _board()

    async def run() -> ToolResult:
        return ToolResult("ran here", worker_id="local")

    result = await board.mirror("s1", CALL, "/ws", 10.0, events.append, run)
    assert result.output == "ran here"
    assert [type(e) for e in events] == [ExternalTaskPending, ExternalTaskCompleted]
    assert isinstance(events[1], ExternalTaskCompleted) and events[1].client_id == "local"
    assert _empty(board)  # never claimable


# -- confirmations -----------------------------------------------------------------------------


async def test_confirmation_answered() -> None:
    confirmations = Confirmations()
    wait = asyncio.create_task(confirmations.wait("s1", "c1", BOUND))
    assert await poll_until(lambda: confirmations.waiting("s1"), what="the call to wait", interval=0) == ["c1"]
    confirmations.answer("s1", "c1", False, "not now")
    assert await wait == Answer(False, "not now")
    assert confirmations.waiting("s1") == []
    with pytest.raises(ConfirmationNotFound):
        confirmations.answer("s1", "c1", True, "")


async def test_confirmation_timeout_and_cancel_leave_nothing() -> None:
    confirmations = Confirmations()
    assert await confirmations.wait("s1", "c1", 0.01) is None
    wait = asyncio.create_task(confirmations.wait("s1", "c2", BOUND))
    await poll_until(lambda: confirmations.waiting("s1"), what="the call to wait", interval=0)
    wait.cancel()
    await asyncio.gather(wait, return_exceptions=True)
    assert confirmations._waiting == {}
    with pytest.raises(ConfirmationNotFound):
        confirmations.answer("s1", "c2", True, "")
