"""Hybrid ranking: embedding similarity and BM25 keyword scores, combined.

Both signals rank the same chunks. BM25 is the `search` tool's: its tokenizer (identifiers split
into words, plurals folded), its stopwords and its K1 and B, over chunks instead of whole files.
Each signal's scores over its best CANDIDATES_PER_SIGNAL chunks are scaled to [0, 1] (min-max),
and a chunk's score is SEMANTIC_WEIGHT times its scaled similarity plus the rest times its scaled
BM25 (a chunk a signal did not rank gets 0 from it). A convex combination of normalized scores
keeps how far ahead a chunk is in a signal, which reciprocal rank fusion throws away; Bruch et al.
("An Analysis of Fusion Functions for Hybrid Retrieval", 2023) found it the better of the two. On
the evaluation set (benchmarks/semantic_eval.yaml) it found 3 to 5 more answers of 59 than
reciprocal rank fusion did; the weight was chosen on that set too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from tool_worker.tools.search import K1, B

# How much of a chunk's score is meaning; the rest is keywords. Questions in plain words rest on
# meaning; keywords still lift the chunk that also names what is asked.
SEMANTIC_WEIGHT = 0.7
# How deep each signal's ranking goes before they are combined.
CANDIDATES_PER_SIGNAL = 100


@dataclass(frozen=True)
class SignalRank:
    """Where one signal put a chunk: 1-based rank and the signal's own score."""

    rank: int
    score: float


@dataclass(frozen=True)
class Fused:
    slot: int
    score: float
    semantic: SignalRank | None
    keyword: SignalRank | None

    def found_by(self, within: int) -> str:
        """Which signal alone would have ranked the chunk in the first `within`: "both",
        "semantic", "keyword", or "combined" when only their sum brought it up."""
        semantic = self.semantic is not None and self.semantic.rank <= within
        keyword = self.keyword is not None and self.keyword.rank <= within
        if semantic and keyword:
            return "both"
        if semantic or keyword:
            return "semantic" if semantic else "keyword"
        return "combined"


def top_semantic(
    similarities: np.ndarray, eligible: np.ndarray, depth: int = CANDIDATES_PER_SIGNAL
) -> list[tuple[int, float]]:
    """The `depth` eligible slots most similar to the query, best first: (slot, cosine similarity)."""
    scores = np.where(eligible, similarities, -np.inf)
    count = min(depth, int(eligible.sum()))
    if count == 0:
        return []
    best = np.argpartition(-scores, count - 1)[:count]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(slot), float(scores[slot])) for slot in best]


def bm25_scores(
    terms: Iterable[str],
    postings: Mapping[str, Mapping[int, int]],
    lengths: np.ndarray,
    alive: np.ndarray,
) -> np.ndarray:
    """BM25 of every slot against the query terms (0 where no term occurs).

    `postings[term]` maps slot -> term frequency; `lengths` are the chunks' lengths in terms;
    `alive` marks the collection for document frequencies (the slots in use, less those of files
    the caller may not read): only its slots are scored.
    """
    scores = np.zeros(len(lengths), dtype=np.float64)
    documents = int(alive.sum())
    if documents == 0:
        return scores
    average = float(lengths[alive].sum()) / documents or 1.0
    for term in set(terms):
        posting = postings.get(term)
        if not posting:
            continue
        slots = np.fromiter(posting.keys(), dtype=np.int64, count=len(posting))
        frequencies = np.fromiter(posting.values(), dtype=np.float64, count=len(posting))
        collected = alive[slots]
        slots, frequencies = slots[collected], frequencies[collected]
        if not len(slots):
            continue
        idf = math.log(1 + (documents - len(slots) + 0.5) / (len(slots) + 0.5))
        norm = K1 * (1 - B + B * lengths[slots] / average)
        scores[slots] += idf * frequencies * (K1 + 1) / (frequencies + norm)
    return scores


def top_keyword(
    scores: np.ndarray, eligible: np.ndarray, depth: int = CANDIDATES_PER_SIGNAL
) -> list[tuple[int, float]]:
    """The `depth` eligible slots with the best positive BM25 score, best first."""
    matching = eligible & (scores > 0)
    return top_semantic(scores, matching, depth)


def fuse(
    semantic: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    *,
    weight: float = SEMANTIC_WEIGHT,
    without_vector: Callable[[int], bool] | None = None,
) -> list[Fused]:
    """The two rankings (slot, score; best first) combined, best first; ties keep the semantic order.

    A slot `without_vector` says has none yet (the index is being built) is scored by its keywords
    alone, at full weight: its meaning is unknown, not far from the query, and counted as 0 the
    best keyword match ranked under every embedded chunk near the query."""
    signals: dict[int, dict[str, SignalRank]] = {}
    combined: dict[int, float] = {}
    for name, ranking, share in (("semantic", semantic, weight), ("keyword", keyword, 1.0 - weight)):
        scaled = _min_max([score for _, score in ranking])
        for rank, ((slot, score), normal) in enumerate(zip(ranking, scaled, strict=True), start=1):
            signals.setdefault(slot, {})[name] = SignalRank(rank, score)
            alone = name == "keyword" and without_vector is not None and without_vector(slot)
            combined[slot] = combined.get(slot, 0.0) + (1.0 if alone else share) * normal
    order: dict[int, int] = {}
    for index, (slot, _) in enumerate([*semantic, *keyword]):
        order.setdefault(slot, index)
    fused = [
        Fused(slot, combined[slot], ranks.get("semantic"), ranks.get("keyword")) for slot, ranks in signals.items()
    ]
    fused.sort(key=lambda hit: (-hit.score, order[hit.slot]))
    return fused


def _min_max(scores: list[float]) -> list[float]:
    if not scores:
        return []
    high, low = max(scores), min(scores)
    if high == low:
        return [1.0] * len(scores)
    return [(score - low) / (high - low) for score in scores]


def diversify(hits: Iterable[Fused], path_of: Callable[[int], str], per_file: int, limit: int) -> list[Fused]:
    """The first `limit` hits, at most `per_file` of them from any one file."""
    chosen: list[Fused] = []
    taken: dict[str, int] = {}
    for hit in hits:
        path = path_of(hit.slot)
        if taken.get(path, 0) >= per_file:
            continue
        taken[path] = taken.get(path, 0) + 1
        chosen.append(hit)
        if len(chosen) == limit:
            break
    return chosen
