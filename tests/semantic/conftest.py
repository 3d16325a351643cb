"""The model, loaded once for the tests that need it, and a way to count what it embeds."""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.semantic import EXTRA_MISSING
from tests.session.conftest import make_server, processes  # noqa: F401 (the session tests' server fixtures)
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ToolResult


class CountingEmbedder:
    """The real embedder, counting the chunk texts it is given (what a build costs)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dimensions = inner.dimensions
        self.documents = 0

    def encode_documents(self, texts: list[str]) -> Any:
        self.documents += len(texts)
        return self.inner.encode_documents(texts)

    def encode_query(self, query: str) -> Any:
        return self.inner.encode_query(query)


class GatedEmbedder(CountingEmbedder):
    """The real embedder, which embeds documents only once `gate` is set: a build the model is busy
    with (queries are still embedded)."""

    def __init__(self, inner: Any, gate: threading.Event) -> None:
        super().__init__(inner)
        self.gate = gate

    def encode_documents(self, texts: list[str]) -> Any:
        self.gate.wait()
        return super().encode_documents(texts)


@pytest.fixture(scope="session")
def real_embedder() -> Any:
    pytest.importorskip("sentence_transformers", reason=EXTRA_MISSING)
    pytest.importorskip("tree_sitter_language_pack", reason=EXTRA_MISSING)
    from tool_worker.semantic.embedder import detect_device, load_embedder

    return load_embedder(detect_device())


@pytest.fixture
def embedder(real_embedder: Any) -> CountingEmbedder:
    return CountingEmbedder(real_embedder)


Search = Callable[..., Awaitable[ToolResult]]


def searcher(state: Any, workspace: Path) -> Search:
    """search(query=..., ...) runs semantic_search on `workspace` through a registry, as a worker does;
    `denied=(...)` gives the call a session's denied paths."""
    registry = ToolRegistry([state.tool()])

    async def search(*, denied: tuple[str, ...] = (), **arguments: Any) -> ToolResult:
        return await registry.execute("semantic_search", workspace, json.dumps(arguments), denied)

    return search
