"""Fixtures every test directory shares."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.processes import kill_all, marker


@pytest.fixture
def mark() -> Iterator[str]:
    """A unique `sleep` argument that finds a test's processes on the host; none survives the test."""
    value = marker()
    yield value
    kill_all(value)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_is_not_ignored() -> Iterator[None]:
    """Tests press Ctrl-C (SIGINT) in their own process and in the CLI processes they start. A run
    started with SIGINT ignored (`pytest &` in a script: the shell ignores it for background jobs,
    and children inherit that) would see neither react, so the run gets Python's usual handler,
    which its children then start with too."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
