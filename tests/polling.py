"""The one way a test waits for a condition that raises no event: a bounded poll.

Tests wait on the events the code emits (a stream message, an asyncio.Event, a future). Some
conditions have none to wait on: a process that dies or starts, a file a subprocess writes, a
server-side state read over an RPC, a worker that connects. Those, and only those, are polled
here: the condition is checked every `interval` seconds until it holds, and the test fails with
what it waited for once `within` seconds pass. The bound only turns a hang into a failure; no
test depends on how fast anything happens.

`poll_until` is for async tests; `wait_until` is the same poll for blocking tests (the CLI and
sync SDK tests, whose server runs on a thread of its own).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Generous: a loaded 2-core machine shared with other test runs must never hit it.
DEFAULT_WITHIN = 10.0
DEFAULT_INTERVAL = 0.02


async def poll_until(
    condition: Callable[[], T | Awaitable[T]],
    *,
    what: str | Callable[[], str],
    within: float = DEFAULT_WITHIN,
    interval: float = DEFAULT_INTERVAL,
) -> T:
    """Checks `condition()` (a value, or an awaitable giving one) until it is truthy and returns
    it; raises AssertionError naming `what` (a text, or a function giving one at the time, e.g.
    the last state seen) after `within` seconds.

    `interval` 0 checks once per turn of the event loop: use it to catch a state that other
    tasks of this loop would otherwise move past between two checks.
    """
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {_described(what)}")
        await asyncio.sleep(interval)


def wait_until(
    condition: Callable[[], T],
    *,
    what: str | Callable[[], str],
    within: float = DEFAULT_WITHIN,
    interval: float = DEFAULT_INTERVAL,
) -> T:
    """`poll_until` for blocking code: checks `condition()` until it is truthy and returns it;
    raises AssertionError naming `what` (a text, or a function giving one at the time, e.g. a
    server's log so far) after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {_described(what)}")
        time.sleep(interval)


def _described(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what
