"""When and how long to wait before retrying a model request: the rules of the official SDKs.

Pure policy shared by the OpenAI and Anthropic providers; the loop that applies it is in
`transport.py`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

# A server may ask for a longer pause than this; the SDKs then fall back to their own backoff
# rather than stall a request for minutes.
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `max_retries` retries, waiting `min(base_delay * 2**n, max_delay)` minus up to 25 %
    jitter, unless the server said how long to wait. Tests inject a tiny `base_delay` or a
    recording `sleep` so they never wait seconds."""

    max_retries: int = 2
    base_delay: float = 0.5
    max_delay: float = 8.0
    random: Callable[[], float] = field(default=random.random, repr=False)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)

    def backoff(self, retries_done: int) -> float:
        return min(self.base_delay * 2**retries_done, self.max_delay) * (1 - 0.25 * self.random())

    def delay(self, retries_done: int, headers: Mapping[str, str] | None = None) -> float:
        """Seconds to wait before retry number `retries_done + 1`."""
        server_delay = retry_after_seconds(headers or {})
        return server_delay if server_delay is not None else self.backoff(retries_done)


def should_retry(status: int, headers: Mapping[str, str], error_code: str | None = None) -> bool:
    """Whether a failed HTTP response is worth retrying."""
    # An exhausted quota does not come back in seconds, whatever the headers say.
    if error_code == "insufficient_quota":
        return False
    explicit = (headers.get("x-should-retry") or "").strip().lower()
    if explicit in ("true", "false"):
        return explicit == "true"
    return status in (408, 409, 429) or status >= 500


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's requested pause (`retry-after-ms`, else `retry-after` in seconds or as an
    HTTP date), or None when absent, unparsable or outside (0, 60] seconds."""
    value: float | None = None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = _float(millis)
        value = None if value is None else value / 1000
    if value is None:
        after = headers.get("retry-after")
        if after is not None:
            value = _float(after)
            if value is None:
                value = _seconds_until(after, time.time() if now is None else now)
    if value is None or not 0 < value <= MAX_RETRY_AFTER:
        return None
    return value


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        return parsedate_to_datetime(http_date).timestamp() - now
    except (TypeError, ValueError, IndexError):
        return None
