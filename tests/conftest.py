"""Fixtures every test directory shares."""

from __future__ import annotations

import logging
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


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """A test that runs a CLI's main() in this process has it set up logging: the root logger's
    handlers are replaced by one writing to the test's captured stderr, which closes with the test.
    Later tests' log records would then fail to print ('--- Logging error ---'), so each test
    ends with the root logger's own handlers as it found them (pytest adds and removes its
    capturing handlers itself, at each phase)."""
    root = logging.getLogger()
    handlers, level = _own_handlers(root), root.level
    yield
    for handler in _own_handlers(root):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _own_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if not type(h).__module__.startswith("_pytest")]
