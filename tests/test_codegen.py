"""Checked-in stubs must equal what scripts/gen_protos.py generates, and buf lint must pass."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "clients" / "python"
PACKAGES = ("codelane/v1", "codelane/reapi")


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), str(tmp_path)],
        check=True, capture_output=True, text=True,
    )
    for package in PACKAGES:
        fresh, checked_in = tmp_path / package, GENERATED / package
        fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
        checked_files = sorted(p.name for p in checked_in.iterdir() if p.is_file())
        assert fresh_files == checked_files, f"{package}: stub set differs: run python scripts/gen_protos.py"
        _, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, fresh_files, shallow=False)
        assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run python scripts/gen_protos.py"


def _buf() -> str | None:
    return os.environ.get("CODELANE_BUF") or shutil.which("buf")


@pytest.mark.skipif(_buf() is None and not os.environ.get("CI"), reason="buf not installed (.ci/run installs it)")
def test_buf_lint_is_clean() -> None:
    buf = _buf()
    assert buf, "CI must provide buf (CODELANE_BUF): see .ci/run"
    result = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
