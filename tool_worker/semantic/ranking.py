"""Hybrid ranking: embedding similarity and BM25 keyword scores, fused by reciprocal rank.

Both signals rank the same chunks. BM25 is the `search` tool's: its tokenizer (identifiers split
into words, plurals folded), its stopwords and its K1 and B, over chunks instead of whole files.
Reciprocal rank fusion (Cormack et al., 2009) adds 1 / (RRF_K + rank) over the signals that
ranked a chunk, so neither signal's scale matters and a chunk both find rises above chunks only
one finds. Each hit keeps its rank and score in each signal, so a result can say what found it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tool_worker.tools.search import K1, B

# The usual constant of reciprocal rank fusion: damps the difference between the first few ranks.
RRF_K = 60
# How deep each signal's ranking goes before fusion: enough for a hit ranked modestly by both.
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

    @property
    def found_by(self) -> str:
        """"both", "semantic" or "keyword"."""
        if self.semantic and self.keyword:
            return "both"
        return "semantic" if self.semantic else "keyword"


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
    `alive` marks the slots in use, which are the collection for document frequencies.
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
        idf = math.log(1 + (documents - len(posting) + 0.5) / (len(posting) + 0.5))
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
    semantic: Sequence[tuple[int, float]],
    keyword: Sequence[tuple[int, float]],
    *,
    k: int = RRF_K,
) -> list[Fused]:
    """Reciprocal rank fusion of two rankings (slot, score), best first; ties keep the semantic order."""
    by_slot: dict[int, dict[str, SignalRank]] = {}
    for name, ranking in (("semantic", semantic), ("keyword", keyword)):
        for rank, (slot, score) in enumerate(ranking, start=1):
            by_slot.setdefault(slot, {})[name] = SignalRank(rank, score)
    fused = [
        Fused(
            slot,
            sum(1.0 / (k + signal.rank) for signal in signals.values()),
            signals.get("semantic"),
            signals.get("keyword"),
        )
        for slot, signals in by_slot.items()
    ]
    order: dict[int, int] = {}
    for index, (slot, _) in enumerate([*semantic, *keyword]):
        order.setdefault(slot, index)
    fused.sort(key=lambda hit: (-hit.score, order[hit.slot]))
    return fused


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
