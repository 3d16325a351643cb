"""Hybrid ranking: BM25 as the `search` tool scores it, embedding similarity, reciprocal rank fusion."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.semantic import EXTRA_MISSING

np = pytest.importorskip("numpy", reason=EXTRA_MISSING)

from tool_worker.semantic.ranking import (  # noqa: E402
    RRF_K,
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


def test_fusion_puts_what_both_signals_found_first_and_says_who_found_what() -> None:
    semantic = [(10, 0.9), (11, 0.8), (12, 0.7)]
    keyword = [(13, 9.0), (12, 5.0)]
    fused = fuse(semantic, keyword)
    assert [hit.slot for hit in fused] == [12, 10, 13, 11]
    both = fused[0]
    assert both.found_by == "both"
    assert both.semantic == SignalRank(3, 0.7) and both.keyword == SignalRank(2, 5.0)
    assert both.score == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 2))
    assert {hit.slot: hit.found_by for hit in fused[1:]} == {10: "semantic", 13: "keyword", 11: "semantic"}


def test_fusion_breaks_ties_by_the_semantic_order() -> None:
    fused = fuse([(1, 0.5)], [(2, 3.0)])
    assert [hit.slot for hit in fused] == [1, 2]


def test_diversify_caps_results_per_file() -> None:
    hits = [Fused(slot, 1.0 / (slot + 1), None, None) for slot in range(6)]
    paths = ["a.py", "a.py", "a.py", "b.py", "a.py", "c.py"]
    chosen = diversify(hits, paths.__getitem__, per_file=2, limit=4)
    assert [hit.slot for hit in chosen] == [0, 1, 3, 5]
