"""WorkerPool logic with fake links: no network, milliseconds."""

from __future__ import annotations

import asyncio

from session_server.pool import Assignment, QueryCall, WorkerPool, WorkerRegistration
from tool_worker.tools.base import ErrorKind, Lane, ToolResult, ToolSpec

READ = ToolSpec("read", "", {"type": "object"}, Lane.QUERY, True)
WRITE_ONCE = ToolSpec("upload", "", {"type": "object"}, Lane.QUERY, False)


class FakeLink:
    def __init__(self, pool: WorkerPool, worker_id: str, fingerprint: str = "fp") -> None:
        self.pool, self.worker_id, self.fingerprint = pool, worker_id, fingerprint
        self.assigned: list[Assignment] = []
        self.cancelled: list[tuple[str, int]] = []
        self.closed = ""

    def assign(self, assignment: Assignment) -> None:
        self.assigned.append(assignment)

    def cancel(self, call_id: str, attempt: int, reason: str) -> None:
        self.cancelled.append((call_id, attempt))

    def probe(self, probe_id: str, workspace: str) -> None:
        asyncio.get_running_loop().call_soon(self.pool.on_probe_result, self.worker_id, probe_id, self.fingerprint, "")

    def drain(self, reason: str) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason

    async def flush(self) -> None:
        pass

    def finish(self, index: int = 0, output: str = "ok") -> None:
        a = self.assigned[index]
        self.pool.on_result(self.worker_id, a.call_id, a.attempt, ToolResult(output=output))


def add_worker(
    pool: WorkerPool,
    worker_id: str,
    *,
    slots: int = 1,
    fingerprint: str = "fp",
    tools: tuple[ToolSpec, ...] = (READ, WRITE_ONCE),
) -> FakeLink:
    link = FakeLink(pool, worker_id, fingerprint)
    pool.register(WorkerRegistration(worker_id=worker_id, tools=tools, slots=slots), link)
    return link


def query(call_id: str, tool: str = "read", session: str = "s") -> QueryCall:
    return QueryCall(
        session_id=session, call_id=call_id, tool_name=tool, arguments_json="{}", workspace="/ws", timeout=5
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_worker_with_a_different_fingerprint_never_gets_the_workspace() -> None:
    pool = WorkerPool(lambda ws: "fp")
    stale = add_worker(pool, "stale", fingerprint="other")
    good = add_worker(pool, "good")
    task = asyncio.create_task(pool.dispatch(query("c1")))
    await settle()
    assert not stale.assigned and len(good.assigned) == 1
    good.finish()
    assert (await task).worker_id == "good"
    views = {w.worker_id: w.workspaces["/ws"] for w in pool.workers()}
    assert views["stale"][0] is False and "different or stale copy" in views["stale"][1]


async def test_credit_holds_after_cancel_until_the_worker_answers() -> None:
    pool = WorkerPool(lambda ws: "fp")
    link = add_worker(pool, "w", slots=1)
    first = asyncio.create_task(pool.dispatch(query("c1")))
    await settle()
    second = asyncio.create_task(pool.dispatch(query("c2")))
    await settle()
    first.cancel()
    await settle()
    assert link.cancelled == [("c1", 1)]
    assert len(link.assigned) == 1  # the slot is still taken: the worker has not answered
    link.finish(0, "cancelled")
    await settle()
    assert [a.call_id for a in link.assigned] == ["c1", "c2"]
    link.finish(1)
    assert (await second).output == "ok"


async def test_lost_worker_retries_idempotent_calls_and_fails_others() -> None:
    pool = WorkerPool(lambda ws: "fp")
    first = add_worker(pool, "w1", slots=2)
    idem = asyncio.create_task(pool.dispatch(query("c1")))
    once = asyncio.create_task(pool.dispatch(query("c2", tool="upload")))
    await settle()
    assert len(first.assigned) == 2
    second = add_worker(pool, "w2", slots=2)
    await settle()
    pool.unregister("w1", first, "stream broken")
    await settle()
    assert [(a.call_id, a.attempt) for a in second.assigned] == [("c1", 2)]
    second.finish(0)
    assert (await idem).attempt == 2
    failed = await once
    assert failed.error_kind is ErrorKind.WORKER_LOST and "not idempotent" in failed.output


async def test_reconnect_with_the_same_id_replaces_the_old_stream() -> None:
    pool = WorkerPool(lambda ws: "fp")
    old = add_worker(pool, "w", slots=1)
    task = asyncio.create_task(pool.dispatch(query("c1")))
    await settle()
    new = add_worker(pool, "w", slots=1)
    await settle()
    assert old.closed and [(a.call_id, a.attempt) for a in new.assigned] == [("c1", 2)]
    pool.unregister("w", old, "old stream ended")  # late end of the old stream changes nothing
    assert [w.worker_id for w in pool.workers()] == ["w"]
    new.finish(0)
    assert (await task).worker_id == "w"


async def test_no_worker_for_a_tool_answers_at_once() -> None:
    pool = WorkerPool(lambda ws: "fp")
    add_worker(pool, "w")
    result = await asyncio.wait_for(pool.dispatch(query("c1", tool="grep")), 1)
    assert result.error_kind is ErrorKind.NO_WORKER and "grep" in result.output
