"""Hybrid ranking: BM25 as the `search` tool scores it, embedding similarity, reciprocal rank fusion."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.semantic import EXTRA_MISSING

np = pytest.importorskip("numpy", reason=EXTRA_MISSING)

from tool_worker.semantic.ranking import (  # noqa: E402
    SEMANTIC_WEIGHT,
    Fused,
    SignalRank,
    bm25_scores,
    diversify,
    fuse,
    top_keyword,
    top_semantic,
)
from tool_worker.tools import search  # noqa: E402

DOCS = {
    "retry.py": "def compute_backoff(attempt):\n    # retry backoff doubles\n    return 2 ** attempt\n",
    "client.py": "def send(request):\n    return retry(request, backoff=1)\n",
    "other.py": "def unrelated():\n    return 'nothing to see'\n",
}


def _postings(docs: list[dict[str, int]]) -> dict[str, dict[int, int]]:
    postings: dict[str, dict[int, int]] = {}
    for slot, terms in enumerate(docs):
        for term, count in terms.items():
            postings.setdefault(term, {})[slot] = count
    return postings


def test_bm25_scores_are_the_search_tools_scores() -> None:
    """Over the same documents (their text and their path's words, as `search` counts them),
    the chunk scorer and the `search` tool agree to the last digit."""
    names = sorted(DOCS)
    documents = []
    for name in names:
        terms = Counter(search.tokenize(DOCS[name]))
        for term, count in Counter(search.tokenize(name)).items():
            terms[term] += search.PATH_WEIGHT * count
        documents.append(dict(terms))
    query = search.query_terms("where is the retry backoff computed")
    # `search` measures a document's length in bytes; give the chunk scorer the same lengths.
    lengths = np.array([len(DOCS[name].encode()) for name in names], dtype=np.float64)
    ours = bm25_scores(query, _postings(documents), lengths, np.ones(len(names), dtype=bool))

    scan = search._Scan(query)
    scan.documents = len(names)
    scan.total_length = int(lengths.sum())
    scan.candidates = [
        (name, len(DOCS[name].encode()), {term: documents[slot][term] for term in query if term in documents[slot]})
        for slot, name in enumerate(names)
        if any(term in documents[slot] for term in query)
    ]
    theirs, _ = search._rank(scan)
    assert {name: score for score, name in theirs} == pytest.approx(
        {name: ours[slot] for slot, name in enumerate(names) if ours[slot] > 0}
    )
    assert ours[names.index("other.py")] == 0


def test_bm25_ignores_dead_slots_in_document_frequencies() -> None:
    documents = [{"retry": 1}, {"retry": 1}, {"other": 1}]
    lengths = np.ones(3)
    everyone = bm25_scores({"retry"}, _postings(documents), lengths, np.array([True, True, True]))
    # The third slot is free (its file was deleted): the collection is two documents, both with "retry".
    two = bm25_scores({"retry"}, _postings(documents[:2]), lengths[:2], np.array([True, True]))
    assert two[0] < everyone[0]


def test_top_semantic_keeps_only_eligible_slots_best_first() -> None:
    similarities = np.array([0.1, 0.9, 0.5, 0.7])
    eligible = np.array([True, False, True, True])
    assert top_semantic(similarities, eligible) == [(3, pytest.approx(0.7)), (2, pytest.approx(0.5)),
                                                    (0, pytest.approx(0.1))]
    assert top_semantic(similarities, eligible, depth=1) == [(3, pytest.approx(0.7))]
    assert top_semantic(similarities, np.zeros(4, dtype=bool)) == []


def test_top_keyword_leaves_out_chunks_without_a_query_word() -> None:
    scores = np.array([0.0, 2.5, 1.0])
    assert top_keyword(scores, np.ones(3, dtype=bool)) == [(1, 2.5), (2, 1.0)]


def test_fusion_weighs_scaled_scores_and_says_who_found_what() -> None:
    semantic = [(10, 0.9), (11, 0.8), (12, 0.5)]
    keyword = [(13, 9.0), (12, 5.0), (14, 1.0)]
    fused = fuse(semantic, keyword)
    scores = {hit.slot: hit.score for hit in fused}
    # Each signal scaled to [0, 1] over its candidates, then weighted.
    assert scores == pytest.approx({
        10: SEMANTIC_WEIGHT * 1.0,
        11: SEMANTIC_WEIGHT * 0.75,
        12: SEMANTIC_WEIGHT * 0.0 + (1 - SEMANTIC_WEIGHT) * 0.5,
        13: (1 - SEMANTIC_WEIGHT) * 1.0,
        14: 0.0,
    })
    assert [hit.slot for hit in fused] == [10, 11, 13, 12, 14]
    twelve = next(hit for hit in fused if hit.slot == 12)
    assert twelve.semantic == SignalRank(3, 0.5) and twelve.keyword == SignalRank(2, 5.0)
    assert twelve.found_by(within=3) == "both"
    assert twelve.found_by(within=2) == "keyword"
    assert fused[0].found_by(within=1) == "semantic"
    assert twelve.found_by(within=1) == "combined"


def test_a_signal_far_ahead_wins_over_a_weak_consensus() -> None:
    """Reciprocal rank fusion would put slot 2 (second in both) above slot 1 (first by far in
    meaning, unranked by keywords); the scaled scores keep the margin."""
    semantic = [(1, 0.80), (2, 0.41), (3, 0.40)]
    keyword = [(3, 6.0), (2, 5.9), (4, 1.0)]
    assert fuse(semantic, keyword)[0].slot == 1


def test_fusion_with_one_signal_silent() -> None:
    assert [hit.slot for hit in fuse([(1, 0.3), (2, 0.3)], [])] == [1, 2]
    only_keywords = fuse([], [(5, 2.0), (6, 1.0)])
    assert [hit.slot for hit in only_keywords] == [5, 6] and only_keywords[0].found_by(1) == "keyword"


def test_a_chunk_not_embedded_yet_is_ranked_by_its_keywords_alone() -> None:
    """While the index is built, few chunks have vectors; one without had 0 for meaning, so the
    best keyword match (a function just edited) ranked under any embedded chunk near the query."""
    semantic = [(1, 0.9), (2, 0.5)]
    keyword = [(3, 10.0), (1, 6.0), (4, 2.0)]
    fused = fuse(semantic, keyword, without_vector=lambda slot: slot in (3, 4))
    assert {hit.slot: hit.score for hit in fused} == pytest.approx({
        3: 1.0,
        1: SEMANTIC_WEIGHT * 1.0 + (1 - SEMANTIC_WEIGHT) * 0.5,
        2: 0.0,
        4: 0.0,
    })
    assert [hit.slot for hit in fused][:2] == [3, 1] and fused[0].found_by(within=1) == "keyword"
    # With every vector there, the same rankings keep their weights.
    assert [hit.slot for hit in fuse(semantic, keyword)][:2] == [1, 3]


def test_fusion_breaks_ties_by_the_semantic_order() -> None:
    fused = fuse([(1, 0.5)], [(2, 3.0)], weight=0.5)
    assert [hit.slot for hit in fused] == [1, 2]


def test_diversify_caps_results_per_file() -> None:
    hits = [Fused(slot, 1.0 / (slot + 1), None, None) for slot in range(6)]
    paths = ["a.py", "a.py", "a.py", "b.py", "a.py", "c.py"]
    chosen = diversify(hits, paths.__getitem__, per_file=2, limit=4)
    assert [hit.slot for hit in chosen] == [0, 1, 3, 5]
