"""The agent loop's promise, on an in-process provider that misbehaves: whatever a provider
raises, the turn ends with ErrorOccurred and TurnFinished(error), its early calls are stopped and
answered, and the history holds no call without its result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from session_server.agent import Turn, TurnContext
from session_server.config import SessionSettings
from session_server.confirmations import Confirmations
from session_server.events import ErrorOccurred, ToolCallFinished, ToolCallStarted, TurnFinished
from session_server.external import ExternalTasks
from session_server.history import History
from session_server.llm.base import ModelRequest, ModelToolCall, StreamItem, TextChunk, ToolCallReady
from session_server.pool import WorkerPool
from session_server.stats import LaneStats
from session_server.store import SessionRecord, Store
from tool_worker.registry import ToolRegistry


class Broken:
    """Streams some text and an early Query call, then raises what it was given."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        yield TextChunk("Reading")
        yield ToolCallReady(0, ModelToolCall("c0", "read", '{"file_path": "a.txt"}'))
        await asyncio.sleep(0)
        raise self.error

    async def aclose(self) -> None:
        return None


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "db")
    store.create_session(SessionRecord(session_id="s1", workspace=str(tmp_path)))
    yield store
    store.close()


@pytest.mark.parametrize("error", [RuntimeError("the provider has a bug"), TypeError("unsupported operand")])
async def test_any_exception_ends_the_turn_with_an_error_and_a_valid_history(
    store: Store, tmp_path: Path, error: BaseException
) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    events: list = []
    pool = WorkerPool()
    ctx = TurnContext(
        session_id="s1", turn_id="t1", workspace=tmp_path, settings=SessionSettings(model="scripted:x"),
        provider=Broken(error), model_name="x", pool=pool, registry=ToolRegistry.builtin(), stats=LaneStats(),
        local_fallback=True, emit=events.append, history=History(store, "s1"), confirmations=Confirmations(),
        external=ExternalTasks(),
    )
    await asyncio.wait_for(Turn(ctx).run("read a.txt"), 10)

    assert isinstance(events[-1], TurnFinished) and events[-1].stop_reason == "error"
    [failure] = [e for e in events if isinstance(e, ErrorOccurred)]
    assert failure.fatal and type(error).__name__ in failure.message and str(error) in failure.message
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [e.call.call_id for e in started] == [e.call_id for e in finished]  # every started call answered
    assert asyncio.all_tasks() == {asyncio.current_task()}  # nothing left running
    assert [m.role for m in store.get_messages("s1")] == ["user"]  # no call without its result
