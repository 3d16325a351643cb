"""The one way a test waits for a condition that raises no event: a bounded poll.

Tests wait on the events the code emits (a stream message, an asyncio.Event, a future). Some
conditions have none to wait on: a process that dies or starts, a file a subprocess writes, a
server-side state read over an RPC, a worker that connects. Those, and only those, are polled
here: the condition is checked every `interval` seconds until it holds, and the test fails with
what it waited for once `within` seconds pass. The bound only turns a hang into a failure; no
test depends on how fast anything happens.
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
    what: str,
    within: float = DEFAULT_WITHIN,
    interval: float = DEFAULT_INTERVAL,
) -> T:
    """Checks `condition()` (a value, or an awaitable giving one) until it is truthy and returns
    it; raises AssertionError naming `what` after `within` seconds.

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
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)
