"""WorkerPool logic with fake links and a fake clock: no network, milliseconds."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from session_server.pool import (
    Assignment,
    InvalidRegistration,
    LinkFault,
    PoolClosed,
    QueryCall,
    TooManyTools,
    WorkerIdTaken,
    WorkerPool,
    WorkerRegistration,
)
from tool_worker.merkle import SHARED, SYNCED, SYNCING, UNAVAILABLE, Digest, Holding, SnapshotRef
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

READ = ToolSpec("read", "", {"type": "object"}, Lane.QUERY, True)
WRITE_ONCE = ToolSpec("upload", "", {"type": "object"}, Lane.QUERY, False)
BOUND = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLink:
    def __init__(self, pool: WorkerPool, worker_id: str) -> None:
        self.pool, self.worker_id = pool, worker_id
        self.assigned: list[Assignment] = []
        self.cancelled: list[str] = []
        self.closed = ""
        self.fault: LinkFault | None = None

    def assign(self, assignment: Assignment) -> None:
        self.assigned.append(assignment)

    def cancel(self, assignment: Assignment, reason: str) -> None:
        self.cancelled.append(assignment.dispatch_id)

    def drain(self, reason: str) -> None:
        pass

    def close(self, reason: str, fault: LinkFault | None = None) -> None:
        self.closed, self.fault = reason, fault

    def finish(self, index: int = 0, output: str = "ok") -> None:
        self.pool.on_result(self.worker_id, self, self.assigned[index].dispatch_id, ToolResult(output=output))


def add_worker(
    pool: WorkerPool,
    worker_id: str,
    *,
    slots: int = 1,
    tools: tuple[ToolSpec, ...] = (READ, WRITE_ONCE),
    reconnect_token: str = "",
) -> FakeLink:
    link = FakeLink(pool, worker_id)
    link.token = pool.register(
        WorkerRegistration(worker_id=worker_id, tools=tools, slots=slots, reconnect_token=reconnect_token), link
    )
    return link


SNAPSHOT = SnapshotRef("/ws", Digest("a" * 64, 10), Digest("b" * 64, 10))
OLDER = Digest("c" * 64, 10)


def query(call_id: str, tool: str = "read", session: str = "s", observer=None) -> QueryCall:
    return QueryCall(
        session_id=session, call_id=call_id, tool_name=tool, arguments_json="{}", workspace="/ws", timeout=5,
        observer=observer, snapshot=SNAPSHOT,
    )


async def until(condition, what: str) -> None:
    """Waits for `condition()`, a loop turn at a time (bounded in real time)."""
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("holdings", "chosen"),
    [
        # who holds what of /ws -> who gets a call for SNAPSHOT (all have free slots; "d" the most)
        ({"a": (SYNCED, SNAPSHOT.digest), "b": (SHARED, OLDER)}, "a"),
        ({"a": (SHARED, SNAPSHOT.digest), "b": (SYNCED, OLDER)}, "a"),
        ({"a": (SYNCING, SNAPSHOT.digest), "b": (SHARED, OLDER)}, "a"),
        ({"b": (SYNCED, OLDER), "c": (SHARED, OLDER)}, "b"),  # most of it beats a rescan
        ({"c": (SHARED, OLDER), "a": (UNAVAILABLE, SNAPSHOT.digest)}, "c"),
        ({"a": (UNAVAILABLE, SNAPSHOT.digest)}, "d"),  # unknown beats unavailable
    ],
)
async def test_routing_prefers_who_holds_the_snapshot_then_most_of_it_then_shared(holdings, chosen) -> None:
    pool = WorkerPool()
    links = {name: add_worker(pool, name, slots=4 if name == "d" else 2) for name in "abcd"}
    pool.on_holdings("unknown", links["a"], [Holding("/ws", SYNCED, SNAPSHOT.digest)])  # not its stream: ignored
    for name, (mode, digest) in holdings.items():
        pool.on_holdings(name, links[name], [Holding("/ws", mode, digest)])
    task = asyncio.create_task(pool.dispatch(query("c1")))
    await until(lambda: any(link.assigned for link in links.values()), "the call is assigned")
    assert [name for name, link in links.items() if link.assigned] == [chosen]
    assert links[chosen].assigned[0].snapshot == SNAPSHOT
    links[chosen].finish()
    assert (await task).worker_id == chosen


async def test_list_workers_shows_what_each_holds() -> None:
    pool = WorkerPool()
    link = add_worker(pool, "w")
    pool.on_holdings("w", link, [Holding("/ws", SYNCING, SNAPSHOT.digest)])
    pool.on_holdings("w", link, [Holding("/ws", SYNCED, SNAPSHOT.digest),
                                 Holding("/full", UNAVAILABLE, None, "disk full")])
    held = pool.worker("w").workspaces
    assert held["/ws"].mode == SYNCED and held["/ws"].digest == SNAPSHOT.digest and held["/ws"].visible
    assert held["/full"].reason == "disk full" and not held["/full"].visible


async def test_calls_with_the_same_model_id_from_two_sessions_never_meet() -> None:
    # Two sessions replaying one script use the same call ids: each result reaches its own call.
    pool = WorkerPool()
    link = add_worker(pool, "w", slots=4)
    a = asyncio.create_task(pool.dispatch(query("call_0", session="s1")))
    b = asyncio.create_task(pool.dispatch(query("call_0", session="s2")))
    await until(lambda: len(link.assigned) == 2, "both calls are assigned")
    assert len({x.dispatch_id for x in link.assigned}) == 2
    by_session = {x.session_id: x for x in link.assigned}
    pool.on_result("w", link, by_session["s2"].dispatch_id, ToolResult(output="for s2"))
    pool.on_result("w", link, by_session["s1"].dispatch_id, ToolResult(output="for s1"))
    assert (await a).output == "for s1" and (await b).output == "for s2"


async def test_credit_holds_after_cancel_until_the_worker_answers() -> None:
    pool = WorkerPool()
    link = add_worker(pool, "w", slots=1)
    first = asyncio.create_task(pool.dispatch(query("c1")))
    await until(lambda: link.assigned, "the first call is assigned")
    second = asyncio.create_task(pool.dispatch(query("c2")))
    await asyncio.sleep(0)
    first.cancel()
    await until(lambda: link.cancelled, "the cancel is sent")
    assert link.cancelled == [link.assigned[0].dispatch_id]
    assert len(link.assigned) == 1  # the slot is still taken: the worker has not answered
    link.finish(0, "cancelled")
    await until(lambda: len(link.assigned) == 2, "the second call gets the slot")
    assert [a.call_id for a in link.assigned] == ["c1", "c2"]
    link.finish(1)
    assert (await second).output == "ok"


class Observer:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def assigned(self, worker_id: str, attempt: int) -> None:
        self.seen.append(("assigned", worker_id, attempt))

    def lost(self, worker_id: str, reason: str, next_attempt: int | None) -> None:
        self.seen.append(("lost", worker_id, next_attempt))


async def test_lost_worker_retries_idempotent_calls_and_fails_others() -> None:
    pool = WorkerPool()
    first = add_worker(pool, "w1", slots=2)
    idem_observer, once_observer = Observer(), Observer()
    idem = asyncio.create_task(pool.dispatch(query("c1", observer=idem_observer)))
    once = asyncio.create_task(pool.dispatch(query("c2", tool="upload", observer=once_observer)))
    await until(lambda: len(first.assigned) == 2, "both calls are on w1")
    second = add_worker(pool, "w2", slots=2)
    pool.unregister("w1", first, "stream broken")
    await until(lambda: second.assigned, "the idempotent call is retried on w2")
    assert [(a.call_id, a.attempt) for a in second.assigned] == [("c1", 2)]
    second.finish(0)
    assert (await idem).attempt == 2
    failed = await once
    assert failed.error_kind is ErrorKind.WORKER_LOST and "not idempotent" in failed.output
    assert idem_observer.seen == [("assigned", "w1", 1), ("lost", "w1", 2), ("assigned", "w2", 2)]
    assert once_observer.seen == [("assigned", "w1", 1), ("lost", "w1", None)]


async def test_a_live_worker_id_cannot_be_taken_but_its_reconnection_takes_it_back() -> None:
    pool = WorkerPool()
    old = add_worker(pool, "w", slots=1)
    task = asyncio.create_task(pool.dispatch(query("c1")))
    await until(lambda: old.assigned, "the call is on the old stream")
    with pytest.raises(WorkerIdTaken, match="held by a connected worker"):
        add_worker(pool, "w")  # an impostor, or a second worker started with the same --id
    with pytest.raises(WorkerIdTaken):
        add_worker(pool, "w", reconnect_token="guessed")
    assert not old.closed

    new = add_worker(pool, "w", slots=1, reconnect_token=old.token)
    await until(lambda: new.assigned, "the call is retried on the new stream")
    assert old.closed and old.fault is LinkFault.REPLACED
    assert [(a.call_id, a.attempt) for a in new.assigned] == [("c1", 2)]
    # The old stream is fenced: its late result and its end change nothing.
    pool.on_result("w", old, old.assigned[0].dispatch_id, ToolResult(output="stale"))
    pool.unregister("w", old, "old stream ended")
    assert [w.worker_id for w in pool.workers()] == ["w"]
    new.finish(0)
    assert (await task).output == "ok"


def test_a_bad_hello_is_refused() -> None:
    pool = WorkerPool()
    for reg, match in [
        (WorkerRegistration(worker_id=" ", tools=(READ,), slots=1), "worker_id is empty"),
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=0), "at least 1 slot"),
        (WorkerRegistration(worker_id="w", tools=(), slots=1), "at least one tool"),
        (WorkerRegistration(worker_id="w", tools=(READ, READ), slots=1), "twice"),
        # A name model APIs refuse would fail every request of every session offered the tool.
        (WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, name="Bad Name!"),), slots=1),
         "not 1-64 letters"),
        (WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, name="x" * 65),), slots=1),
         "not 1-64 letters"),
        # Execute calls run on the server: offered by a worker, it could only ever fail.
        (WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, name="deploy", lane=Lane.EXECUTE),),
                            slots=1), "Query tools only"),
        # A model's arguments are an object: no call of these could ever run.
        (WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, parameters={"type": "string"}),),
                            slots=1), 'allows no JSON object \\(its type is "string"\\)'),
        (WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, parameters={"type": ["array", "null"]}),),
                            slots=1), "allows no JSON object"),
        # Each goes into every log line about the worker: a line break forged log lines.
        (WorkerRegistration(worker_id="w\nERROR forged", tools=(READ,), slots=1), "worker_id .* unprintable"),
        (WorkerRegistration(worker_id="w" * 257, tools=(READ,), slots=1), "worker_id is 257 characters"),
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=1, hostname="h\x00"), "hostname .* unprintable"),
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=1, version="1" * 300), "version is 300"),
        # Shown by ListWorkers and the CLI, and matched by routing: as printable as the id.
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=1, labels={"gpu\x1b[2J": "a"}),
         "labels key .* unprintable"),
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=1, labels={"gpu": "A100\n"}),
         r"labels\['gpu'\] .* unprintable"),
        (WorkerRegistration(worker_id="w", tools=(READ,), slots=1, labels={"k": "v" * 257}),
         r"labels\['k'\] is 257 characters"),
    ]:
        with pytest.raises(InvalidRegistration, match=match):
            pool.register(reg, FakeLink(pool, "w"))
    assert pool.workers() == []


def test_a_worker_may_not_offer_a_tool_named_like_one_the_server_executes() -> None:
    pool = WorkerPool(server_execute_tools=frozenset({"bash", "write"}))
    with pytest.raises(InvalidRegistration, match="'bash' is one of the server's Execute tools"):
        pool.register(WorkerRegistration(worker_id="w", tools=(dataclasses.replace(READ, name="bash"),), slots=1),
                      FakeLink(pool, "w"))
    assert pool.workers() == []
    pool.register(WorkerRegistration(worker_id="w", tools=(READ,), slots=1, hostname="host-1 (rack 2)",
                                     version="0.3.0+dev"), FakeLink(pool, "w"))
    assert [w.worker_id for w in pool.workers()] == ["w"]


def tools_named(*names: str) -> tuple[ToolSpec, ...]:
    return tuple(dataclasses.replace(READ, name=name) for name in names)


def test_tool_names_past_max_tools_are_refused_and_names_already_offered_always_join() -> None:
    # The server offers read and bash itself; 5 names in all may be offered.
    pool = WorkerPool(server_tools=frozenset({"read", "bash"}), max_tools=5)
    add_worker(pool, "a", tools=tools_named("read", "t1", "t2"))
    refusal = r"offers 4 tool names .* at most 5 \(--max-tools\); this worker would add 2: t3, t4"
    with pytest.raises(TooManyTools, match=refusal):
        pool.register(WorkerRegistration(worker_id="b", tools=tools_named("t3", "t4"), slots=1), FakeLink(pool, "b"))
    assert [w.worker_id for w in pool.workers()] == ["a"]
    add_worker(pool, "b", tools=tools_named("t1", "t2", "read"))  # capacity, no new name
    token = add_worker(pool, "c", tools=tools_named("t2", "t3")).token  # one new name: 5
    with pytest.raises(TooManyTools):
        add_worker(pool, "d", tools=tools_named("t4"))
    # A worker's reconnection replaces its own names rather than adding to them.
    add_worker(pool, "c", tools=tools_named("t4"), reconnect_token=token)
    with pytest.raises(TooManyTools):
        add_worker(pool, "d", tools=tools_named("t3"))
    # Names only draining workers offer are on their way out, as for one spec per name.
    pool.drain("c")
    add_worker(pool, "d", tools=tools_named("t1", "t3"))
    assert sorted(w.worker_id for w in pool.workers() if not w.draining) == ["a", "b", "d"]


def test_max_tools_zero_is_no_limit() -> None:
    pool = WorkerPool(server_tools=frozenset({"read"}), max_tools=0)
    add_worker(pool, "a", tools=tools_named(*(f"t{i}" for i in range(200))))
    assert len(pool.workers()) == 1


async def test_a_silent_worker_is_lost_on_the_clock_and_its_stream_ended_with_a_reason() -> None:
    clock = Clock()
    pool = WorkerPool(heartbeat_timeout=6.0, clock=clock)
    quiet = add_worker(pool, "quiet")
    chatty = add_worker(pool, "chatty")
    clock.now += 4
    pool.heartbeat("chatty", chatty)
    clock.now += 3
    pool.check()
    assert [w.worker_id for w in pool.workers()] == ["chatty"]
    assert quiet.fault is LinkFault.HEARTBEAT_TIMEOUT and "no heartbeat" in quiet.closed
    assert not chatty.closed


async def test_a_timeout_shorter_than_the_interval_shortens_the_interval() -> None:
    # --heartbeat-timeout 1 with the 2 s interval dropped every idle worker between two
    # heartbeats: it reconnected, and was dropped again, about once a second.
    clock = Clock()
    pool = WorkerPool(heartbeat_timeout=1.0, clock=clock)
    assert pool.heartbeat_interval == pytest.approx(1 / 3)
    link = add_worker(pool, "w")
    for _ in range(10):  # the silence between two heartbeats sent at the Welcome's interval
        clock.now += pool.heartbeat_interval
        pool.check()
        pool.heartbeat("w", link)
    assert [w.worker_id for w in pool.workers()] == ["w"] and not link.closed
    assert WorkerPool(heartbeat_timeout=60.0).heartbeat_interval == 2.0


async def test_the_monitor_survives_a_failing_link_and_keeps_dropping_silent_workers() -> None:
    clock = Clock()
    pool = WorkerPool(heartbeat_timeout=1.0, heartbeat_interval=0.01, clock=clock)

    class BrokenLink(FakeLink):
        def close(self, reason: str, fault: LinkFault | None = None) -> None:
            raise RuntimeError("the stream is already finished")

    broken = BrokenLink(pool, "broken")
    pool.register(WorkerRegistration(worker_id="broken", tools=(READ,), slots=1), broken)
    pool.start()
    try:
        clock.now += 2
        await until(lambda: not pool.workers(), "the broken worker is dropped")
        later = add_worker(pool, "later")
        clock.now += 2
        await until(lambda: later.closed, "a worker that goes silent afterwards is dropped too")
        assert pool.workers() == []
    finally:
        await pool.close()


async def test_a_lost_workers_call_waits_no_worker_wait_on_the_clock_for_another() -> None:
    # The bound the e2e test (all workers killed) once checked with a wall clock.
    clock = Clock()
    pool = WorkerPool(no_worker_wait=1.0, clock=clock)
    link = add_worker(pool, "w")
    dispatching = asyncio.create_task(pool.dispatch(query("c1")))
    await until(lambda: link.assigned, "the call is assigned")
    pool.unregister("w", link, "killed")  # requeued for a second attempt, nobody to take it
    pool.check()  # orphaned from now
    clock.now += 0.5  # halfway (binary fractions: no rounding on this clock)
    pool.check()
    await asyncio.sleep(0)
    assert not dispatching.done()
    clock.now += 0.5
    pool.check()
    result = await asyncio.wait_for(dispatching, BOUND)
    assert result.error_kind is ErrorKind.NO_WORKER and result.attempt == 2
    assert "(waited 1s for one to connect)" in result.output


async def test_no_worker_for_a_tool_answers_at_once() -> None:
    pool = WorkerPool()
    add_worker(pool, "w")
    result = await asyncio.wait_for(pool.dispatch(query("c1", tool="grep")), 1)
    assert result.error_kind is ErrorKind.NO_WORKER and "grep" in result.output


async def test_a_deadline_ends_the_call_with_a_timeout_naming_the_worker() -> None:
    pool = WorkerPool()
    link = add_worker(pool, "w")
    call = query("c1")
    call.timeout = 0.05
    result = await asyncio.wait_for(pool.dispatch(call), BOUND)
    assert result.error_kind is ErrorKind.TIMEOUT and "on worker w" in result.output
    assert link.cancelled == [link.assigned[0].dispatch_id]


async def test_fairness_round_robin_across_sessions() -> None:
    pool = WorkerPool()
    link = add_worker(pool, "w", slots=1)
    first = asyncio.create_task(pool.dispatch(query("busy", session="hog")))
    await until(lambda: link.assigned, "the first call holds the only slot")
    hog = [asyncio.create_task(pool.dispatch(query(f"h{i}", session="hog"))) for i in range(5)]
    await asyncio.sleep(0)
    small = asyncio.create_task(pool.dispatch(query("s0", session="small")))
    await asyncio.sleep(0)
    for index in range(3):
        link.finish(index)
        await until(lambda i=index: len(link.assigned) > i + 1, "the slot is handed on")
    order = [a.session_id for a in link.assigned[1:3]]
    assert order == ["hog", "small"]  # the small session's call did not wait behind all of hog's
    for task in [first, *hog, small]:
        task.cancel()
    await asyncio.gather(first, *hog, small, return_exceptions=True)


async def test_a_closed_pool_admits_no_worker() -> None:
    pool = WorkerPool()
    await pool.close()
    with pytest.raises(PoolClosed, match="shutting down"):
        pool.register(WorkerRegistration(worker_id="late", tools=(READ,), slots=1), FakeLink(pool, "late"))
    assert pool.workers() == []
