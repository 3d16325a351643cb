from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from session_server.llm.retry import RetryPolicy, retry_after_seconds, should_retry

NOW = 1_700_000_000.0


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "2"}, 2.0),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "60"}, 60.0),
        ({"retry-after": "61"}, None),
        ({"retry-after": "0"}, None),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": http_date(10)}, 10.0),
        ({"retry-after": http_date(-10)}, None),
        ({"retry-after": http_date(3600)}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("status", "headers", "code", "expected"),
    [
        (408, {}, None, True),
        (409, {}, None, True),
        (429, {}, "rate_limit_exceeded", True),
        (500, {}, None, True),
        (503, {}, None, True),
        (529, {}, None, True),
        (400, {}, None, False),
        (401, {}, None, False),
        (404, {}, None, False),
        (400, {"x-should-retry": "true"}, None, True),
        (500, {"x-should-retry": "false"}, None, False),
        (429, {}, "insufficient_quota", False),
        (429, {"x-should-retry": "true"}, "insufficient_quota", False),
    ],
)
def test_should_retry(status: int, headers: dict[str, str], code: str | None, expected: bool) -> None:
    assert should_retry(status, headers, code) is expected


def test_backoff_doubles_to_the_cap_with_up_to_a_quarter_jitter() -> None:
    no_jitter = RetryPolicy(random=lambda: 0.0)
    full_jitter = RetryPolicy(random=lambda: 1.0)
    assert [no_jitter.backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert full_jitter.backoff(0) == 0.375
    assert RetryPolicy(base_delay=0.001, random=lambda: 0.0).backoff(1) == 0.002


def test_delay_prefers_the_server_hint() -> None:
    policy = RetryPolicy(random=lambda: 0.0)
    assert policy.delay(1, {"retry-after": "7"}) == 7.0
    assert policy.delay(1, {"retry-after": "600"}) == 1.0
    assert policy.delay(0) == 0.5
