"""Where a semantic_search call spends its time on a large tree, stage by stage, without the build.

    python -m benchmarks.semantic_profile [--tree-files 5000] [--tree-dir DIR] [--calls 59]

Building a 5,000-file index with the model takes a quarter of an hour of both cores; what a
query costs does not depend on the vectors' values. So this indexes the tree with the real
chunker and random unit vectors of the model's dimension in place of the model's, then times,
call after call (the evaluation's questions), each stage of a warm call apart: rg's listing,
the model reading the query (the real model), the refresh, each step of `search`, and the
rendering; and the whole call through a `ToolRegistry`, as a worker runs it, twice: once
listing and stating the tree, once finding it unchanged (the watch); both must give the same
results. Medians and p90s,
in milliseconds. The tree is that of `semantic_bench` (site-packages' first files by path); with
`--tree-dir` it is kept and reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import count
from benchmarks.semantic_bench import load_questions, source_tree
from tool_worker.confinement.readonly import ReadOnlyLauncher
from tool_worker.registry import ToolRegistry
from tool_worker.semantic import index as index_module
from tool_worker.semantic import ranking
from tool_worker.semantic.embedder import detect_device, load_embedder
from tool_worker.semantic.tool import SemanticSearch, _render, workspace_files
from tool_worker.tools.search import query_terms


class RandomVectors:
    """The real model for queries; random unit vectors for chunks (what a build would give, as far
    as a query's cost goes)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.model_id = f"{model.model_id}-random"
        self.dimensions = model.dimensions
        self._random = np.random.default_rng(19)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        vectors = self._random.standard_normal((len(texts), self.dimensions)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_query(self, query: str) -> np.ndarray:
        return self.model.encode_query(query)


def timed(stages: dict[str, list[float]], name: str, function: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = function()
    stages.setdefault(name, []).append(time.perf_counter() - started)
    return value


def search_stages(index: Any, query_vector: np.ndarray, terms: frozenset[str], stages: dict[str, list[float]]) -> Any:
    """`WorkspaceIndex.search`'s steps, timed apart (the same calls, in the same order)."""
    with index._lock:
        used = len(index._info)
        alive = index._alive[:used]
        eligible = timed(stages, "search: eligible", alive.copy)
        embedded = index._embedded[:used]
        similarities = timed(
            stages, "search: similarities", lambda: index_module._best_similarities(index._vectors[:used], query_vector)
        )
        semantic = timed(
            stages, "search: top semantic", lambda: ranking.top_semantic(similarities, eligible & embedded)
        )
        scores = timed(stages, "search: bm25",
                       lambda: ranking.bm25_scores(terms, index._postings, index._lengths[:used], alive))
        keyword = timed(stages, "search: top keyword", lambda: ranking.top_keyword(scores, eligible))
        info = index._info
        timed(stages, "search: fuse + diversify", lambda: ranking.diversify(
            ranking.fuse(semantic, keyword), lambda slot: info[slot].path, index_module.RESULTS_PER_FILE, 10))


async def profile(tree: Path, questions: list[str], cache: Path) -> dict[str, list[float]]:
    model = load_embedder(detect_device())
    embedder = RandomVectors(model)
    state = SemanticSearch(embedder, cache)  # type: ignore[arg-type]
    launcher = ReadOnlyLauncher()
    names = (await workspace_files(tree, launcher)).names
    index = state.index_for(tree)
    never = threading.Event()
    started = time.perf_counter()
    await asyncio.to_thread(index.refresh, names, math.inf, never)
    await asyncio.to_thread(index.wait_embedded, math.inf, never)
    print(f"indexed {len(names):,} files, {index.chunk_count():,} chunks (random vectors) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)

    registry = ToolRegistry([state.tool()])
    stages: dict[str, list[float]] = {}
    for query in questions[:3]:  # the first calls settle caches
        await registry.execute("semantic_search", tree, json.dumps({"query": query}))
    for query in questions:
        started = time.perf_counter()
        listing = (await workspace_files(tree, launcher)).names
        stages.setdefault("rg --files", []).append(time.perf_counter() - started)
        vector = timed(stages, "encode_query", lambda query=query: model.encode_query(query))
        # Without a listing number: the refresh proves nothing, so the next call lists the tree.
        report = timed(stages, "refresh", lambda listing=listing: index.refresh(listing, math.inf, never))
        terms = query_terms(query)
        search_stages(index, vector, terms, stages)
        outcome = timed(stages, "search (whole)", lambda vector=vector, terms=terms: index.search(vector, terms, 10))
        timed(stages, "render", lambda query=query, outcome=outcome, report=report: _render(
            tree, query, outcome, report, 10))
        # The same call twice: the first lists and stats the tree (the refresh above proved
        # nothing), the second finds it unchanged.
        results = []
        for name in ("whole call, tree listed", "whole call, tree unchanged"):
            started = time.perf_counter()
            result = await registry.execute("semantic_search", tree, json.dumps({"query": query}))
            stages.setdefault(name, []).append(time.perf_counter() - started)
            assert not result.is_error, result.output
            results.append(result.metadata)
        assert results[0] == results[1], f"the two paths ranked {query!r} differently"
        timed(stages, "current() (unchanged)", lambda: index.current(()))
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.semantic_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--tree-files", type=int, default=5000, help="files in the tree (default 5000)")
    parser.add_argument("--tree-dir", type=Path, help="keep the tree here and reuse it (default: a scratch directory)")
    parser.add_argument("--calls", type=count, default=59, help="timed calls (the evaluation's first questions)")
    args = parser.parse_args(argv)
    _, questions = load_questions(quick=False)
    texts = [question.text for question in questions][: args.calls]
    with tempfile.TemporaryDirectory(prefix="semantic-profile-") as scratch:
        tree = args.tree_dir or Path(scratch) / "tree"
        if not tree.is_dir():
            source_tree(args.tree_files, tree)
        stages = asyncio.run(profile(tree, texts, Path(scratch) / "cache"))
    print(f"{'stage':<28}{'p50 ms':>9}{'p90 ms':>9}  ({len(texts)} calls)")
    for name, times in stages.items():
        ordered = sorted(times)
        p50, p90 = statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]
        print(f"{name:<28}{p50 * 1000:>9.2f}{p90 * 1000:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
