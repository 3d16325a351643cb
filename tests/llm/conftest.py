"""Shared pieces for the LLM tests: a two-step script, a tool spec, a fast retry policy and a
fixture that starts the mock LLM server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from session_server.llm.base import ChatMessage, ModelRequest, ModelToolCall, StreamItem
from session_server.llm.retry import RetryPolicy
from session_server.llm.script import Script
from session_server.mock_llm import MOCK_LLM_KEY, MockLLM, start_mock_llm
from tool_worker.tools.base import Lane, ToolSpec

SCRIPT_DATA = {
    "responses": [
        {
            "text": "Looking around.",
            "tool_calls": [
                {"name": "grep", "arguments": {"pattern": "def ", "path": "."}},
                {"name": "read", "arguments": {"file_path": "README.md"}},
            ],
        },
        {"text": "All done, nothing else to change."},
    ]
}

GREP = ToolSpec(
    name="grep",
    description="Search files.",
    parameters={"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]},
    lane=Lane.QUERY,
    idempotent=True,
)


@pytest.fixture
def script() -> Script:
    return Script.from_data(SCRIPT_DATA)


def first_request(model: str = "mock-model") -> ModelRequest:
    return ModelRequest(model, "You are terse.", [ChatMessage("user", "Find the functions.")], [GREP])


def second_request(model: str = "mock-model") -> ModelRequest:
    """The follow-up after the first scripted turn, with both tool results."""
    calls = [
        ModelToolCall("call_0_0", "grep", '{"pattern": "def ", "path": "."}'),
        ModelToolCall("call_0_1", "read", '{"file_path": "README.md"}'),
    ]
    history = [
        ChatMessage("user", "Find the functions."),
        ChatMessage("assistant", "Looking around.", calls),
        ChatMessage("tool", "a.py:1:def f()", tool_call_id="call_0_0"),
        ChatMessage("tool", "no such file", tool_call_id="call_0_1", is_error=True),
    ]
    return ModelRequest(model, "You are terse.", history, [GREP])


class SleepRecorder:
    """A RetryPolicy sleep that records the delays and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def fast_policy(sleeps: SleepRecorder) -> RetryPolicy:
    return RetryPolicy(base_delay=0.001, sleep=sleeps)


MockFactory = Callable[..., Awaitable[tuple[MockLLM, str]]]


@pytest.fixture
async def mock_llm(script: Script) -> AsyncIterator[MockFactory]:
    """`await mock_llm(**options)` starts a mock (default: the shared script) and returns it and its URL."""
    runners = []

    async def start(script_override: Script | None = None, **options: Any) -> tuple[MockLLM, str]:
        runner, url = await start_mock_llm(script_override or script, "127.0.0.1", 0, **options)
        runners.append(runner)
        return runner.app[MOCK_LLM_KEY], url

    yield start
    for runner in runners:
        await runner.cleanup()


async def collect(stream: AsyncIterator[StreamItem]) -> list[StreamItem]:
    return [item async for item in stream]


@pytest.fixture
async def model_http() -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP session providers under test use (providers speak aiohttp; `http` is for talking
    to the mock directly)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session:
        yield session


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ModelServer = Callable[[Handler], Awaitable[str]]


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    """`await model_server(handler)` serves `handler` for every POST on 127.0.0.1 and returns the
    base URL: a model API that answers the way a test needs."""
    runners = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        # A handler that waits on purpose ends with its connection, and shutdown does not linger.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client for providers under test. Without TLS verification setup it starts in microseconds
    (loading CA certificates takes ~0.1 s a client), and tests only speak plain HTTP to 127.0.0.1."""
    async with httpx.AsyncClient(verify=False, timeout=5.0) as client:
        yield client
