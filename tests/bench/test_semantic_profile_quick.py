"""The semantic_search profile on a small tree: it times every stage, and a call on an unchanged
tree (the watch's shortcut) gives the same results as one that lists it (the profile asserts it
for every query). No timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.semantic import EXTRA_MISSING

pytest.importorskip("sentence_transformers", reason=EXTRA_MISSING)

from benchmarks import semantic_profile


@pytest.mark.timeout(600)
def test_the_profile_times_every_stage_and_both_paths_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert semantic_profile.main(["--tree-files", "30", "--calls", "4", "--tree-dir", str(tmp_path / "tree")]) == 0
    printed = capsys.readouterr().out
    for stage in ("rg --files", "encode_query", "refresh", "search: similarities", "search: bm25", "render",
                  "whole call, tree listed", "whole call, tree unchanged", "current() (unchanged)"):
        assert f"\n{stage} " in printed, printed
