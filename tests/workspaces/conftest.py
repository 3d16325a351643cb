"""Fixtures of the workspace tests: the pool's real-process harness (servers, worker processes)."""

from tests.pool.conftest import make_server, workers

__all__ = ["make_server", "workers"]
