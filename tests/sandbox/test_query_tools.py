"""Query tools' processes (ripgrep) run read-only and without network, on workers and on the
server alike: the launcher they start from, tried with a shell in place of rg."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from tool_worker.confinement import readonly
from tool_worker.confinement.readonly import ConfinementUnavailable, ReadOnlyLauncher
from tool_worker.registry import ToolRegistry

pytestmark = pytest.mark.skipif(ReadOnlyLauncher().problem != "", reason="this host has no Landlock")
BASH = shutil.which("bash") or "/bin/bash"


async def _shell(launcher: ReadOnlyLauncher, command: str, cwd: Path) -> tuple[int, str]:
    proc = await launcher.exec(BASH, "-c", command, cwd=cwd)
    stdout = await proc.stdout.read()
    stderr = await proc.stderr.read()
    return await proc.wait(), (stdout + stderr).decode()


async def test_processes_may_read_but_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("readable\n")
    launcher = ReadOnlyLauncher()
    assert await _shell(launcher, "cat notes.txt", tmp_path) == (0, "readable\n")
    code, output = await _shell(launcher, "echo changed > notes.txt", tmp_path)
    assert code != 0 and "Permission denied" in output
    code, output = await _shell(launcher, "touch new.txt; mkdir newdir; rm notes.txt", tmp_path)
    assert code != 0 and not (tmp_path / "new.txt").exists() and not (tmp_path / "newdir").exists()
    assert (tmp_path / "notes.txt").read_text() == "readable\n"


async def test_processes_cannot_connect(tmp_path: Path, listener: Any) -> None:
    code, output = await _shell(ReadOnlyLauncher(), f"exec 3<>/dev/tcp/127.0.0.1/{listener.port}", tmp_path)
    assert code != 0 and "Permission denied" in output
    assert listener.accepted == 0


async def test_grep_works_through_the_read_only_launcher(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("needle = 1\n")
    result = await ToolRegistry.builtin().execute("grep", tmp_path, json.dumps({"pattern": "needle"}))
    assert not result.is_error and result.output == "a.py"


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_thread_landlock_refuses_to_confine_is_said_when_it_happens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, allowed: bool
) -> None:
    # The host has Landlock, so the start-up line names it; the kernel may still refuse one thread
    # (a seccomp filter, a limit on nested rulesets). With --allow-unsandboxed ripgrep then ran
    # unconfined, and without it every Query tool failed, neither said in the log. The refusal is
    # the kernel's, stood in for here by a ruleset whose restrict() fails as the syscall would.
    class Refused(readonly.Ruleset):
        def restrict(self) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(readonly, "Ruleset", Refused)
    caplog.set_level(logging.WARNING, logger="codelane.sandbox")
    launcher = ReadOnlyLauncher(allow_unconfined=allowed)
    if allowed:
        assert await _shell(launcher, "echo ran", tmp_path) == (0, "ran\n")
    else:
        with pytest.raises(ConfinementUnavailable, match="Landlock refused"):
            await _shell(launcher, "echo ran", tmp_path)
    said = [r.getMessage() for r in caplog.records if "Landlock refused" in r.getMessage()]
    assert said and ("runs unconfined" if allowed else "fail") in said[0], said
