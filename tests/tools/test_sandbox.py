from __future__ import annotations

import os
from pathlib import Path

import pytest

from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import ErrorKind, ToolFailure


def test_relative_and_absolute_inside(workspace: Path) -> None:
    real = Path(os.path.realpath(workspace))
    assert resolve_in_workspace(workspace, "src/app.py") == real / "src" / "app.py"
    assert resolve_in_workspace(workspace, str(workspace / "src")) == real / "src"
    assert resolve_in_workspace(workspace, ".") == real
    assert resolve_in_workspace(workspace, "src/../README.md") == real / "README.md"
    assert resolve_in_workspace(workspace, "not/yet/there.txt") == real / "not" / "yet" / "there.txt"


@pytest.mark.parametrize("user_path", ["..", "../outside.txt", "src/../../x", "/etc/passwd", "/"])
def test_escapes(workspace: Path, user_path: str) -> None:
    with pytest.raises(ToolFailure) as info:
        resolve_in_workspace(workspace, user_path)
    assert info.value.kind is ErrorKind.PATH_ESCAPE
    assert str(info.value) == f"path escapes the workspace: {user_path}"


def test_sibling_with_common_prefix_is_outside(workspace: Path) -> None:
    sibling = workspace.parent / (workspace.name + "2")
    sibling.mkdir()
    with pytest.raises(ToolFailure):
        resolve_in_workspace(workspace, str(sibling / "a"))


def test_symlink_pointing_out_escapes(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    (workspace / "link").symlink_to(tmp_path / "secret.txt")
    (workspace / "dirlink").symlink_to(tmp_path)
    for user_path in ("link", "dirlink/secret.txt", "dirlink"):
        with pytest.raises(ToolFailure) as info:
            resolve_in_workspace(workspace, user_path)
        assert info.value.kind is ErrorKind.PATH_ESCAPE


def test_symlink_pointing_in_is_fine(workspace: Path) -> None:
    (workspace / "inner").symlink_to(workspace / "src")
    real = Path(os.path.realpath(workspace))
    assert resolve_in_workspace(workspace, "inner/app.py") == real / "src" / "app.py"


def test_workspace_behind_a_symlink(workspace: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(workspace)
    assert resolve_in_workspace(alias, "src/app.py") == Path(os.path.realpath(workspace)) / "src" / "app.py"


def test_final_symlink_kept_when_asked(workspace: Path, tmp_path: Path) -> None:
    (workspace / "out").symlink_to(tmp_path)
    real = Path(os.path.realpath(workspace))
    assert resolve_in_workspace(workspace, "out", follow_final_symlink=False) == real / "out"
    with pytest.raises(ToolFailure):
        resolve_in_workspace(workspace, "out/x", follow_final_symlink=False)
    with pytest.raises(ToolFailure):
        resolve_in_workspace(workspace, "..", follow_final_symlink=False)


def test_nul_byte_is_invalid(workspace: Path) -> None:
    with pytest.raises(ToolFailure) as info:
        resolve_in_workspace(workspace, "a\0b")
    assert info.value.kind is ErrorKind.INVALID_ARGUMENTS
