"""The tools that run ripgrep never pass a failed or unfinished run off as an answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fake_rg import PARTIAL_NAME, install_failing_rg
from tool_worker.tools.base import ToolResult

# Each tool that runs rg, with arguments it accepts.
RG_TOOLS = [
    ("glob", {"pattern": "*"}),
    ("list_files", {}),
    ("grep", {"pattern": "load_config"}),
    ("search", {"query": "load config"}),
]


async def _with_failing_rg(call: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, tool: str,
                           arguments: dict) -> ToolResult:
    install_failing_rg(monkeypatch, tmp_path, how)
    result = await call(tool, **arguments)
    assert result.is_error
    return result


@pytest.mark.parametrize(("tool", "arguments"), RG_TOOLS, ids=[tool for tool, _ in RG_TOOLS])
async def test_an_rg_killed_halfway_is_an_error_not_a_short_answer(
    call: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str, arguments: dict
) -> None:
    # Its exit status was read only for 2: a listing cut short by SIGKILL came back as complete.
    result = await _with_failing_rg(call, tmp_path, monkeypatch, "killed", tool, arguments)
    assert "ripgrep was killed by SIGKILL before it finished" in result.output
    assert PARTIAL_NAME not in result.output


@pytest.mark.parametrize(("tool", "arguments"), RG_TOOLS, ids=[tool for tool, _ in RG_TOOLS])
async def test_an_rg_that_listed_nothing_and_failed_says_why(
    call: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str, arguments: dict
) -> None:
    # `search` read an empty listing as an empty workspace: "no files match", for every query.
    result = await _with_failing_rg(call, tmp_path, monkeypatch, "failed", tool, arguments)
    assert "failed" in result.output and "Permission denied (os error 13)" in result.output


@pytest.mark.parametrize(("tool", "arguments"), RG_TOOLS, ids=[tool for tool, _ in RG_TOOLS])
async def test_an_answer_says_when_rg_could_not_read_part_of_the_tree(
    call: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str, arguments: dict
) -> None:
    # rg exits 2 after its answer when a file or directory could not be read, and --no-messages
    # keeps which to itself: the answer read as the whole tree's.
    install_failing_rg(monkeypatch, tmp_path, "partial")
    result = await call(tool, **arguments)
    assert not result.is_error, result.output
    assert "some files or directories could not be read" in result.output, result.output


async def test_a_healthy_rg_still_answers(call: Any) -> None:
    # The same calls with the real rg: the checks above fail on failure only.
    for tool, arguments in RG_TOOLS:
        result = await call(tool, **arguments)
        assert not result.is_error, (tool, result.output)
        assert "could not be read" not in result.output, (tool, result.output)
