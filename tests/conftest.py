"""Fixtures every test directory shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.processes import kill_all, marker


@pytest.fixture
def mark() -> Iterator[str]:
    """A unique `sleep` argument that finds a test's processes on the host; none survives the test."""
    value = marker()
    yield value
    kill_all(value)
