"""A stand-in for ripgrep that fails the way a real one can: killed halfway through its listing
(the OOM killer, an operator), exiting 2 with nothing listed (its root unreadable), or exiting 2
after its whole answer (a file or directory in the tree it could not read)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tool_worker.tools import rg

# What the killed one printed before it died: never to be shown as if it were the whole answer.
PARTIAL_NAME = "partial-listing-before-the-kill.py"


def install_failing_rg(monkeypatch: pytest.MonkeyPatch, directory: Path, how: str) -> None:
    """Makes every tool run `how` ("killed", "failed" or "partial") instead of rg, until the test
    ends."""
    scripts = {
        "killed": f"#!/bin/sh\nprintf '{PARTIAL_NAME}\\0'\nkill -9 $$\n",
        "failed": "#!/bin/sh\necho 'rg: .: Permission denied (os error 13)' >&2\nexit 2\n",
        "partial": f"#!/bin/sh\n'{rg.rg_binary()}' \"$@\"\nexit 2\n",
    }
    fake = directory / f"rg-{how}"
    fake.write_text(scripts[how])
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setattr(rg, "rg_binary", lambda: str(fake))
