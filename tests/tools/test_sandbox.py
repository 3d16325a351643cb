from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tool_worker.sandbox import real_path, resolve_in_workspace
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


def _random_tree(root: Path, outside: Path, rng: random.Random) -> list[str]:
    """Directories, files, a FIFO and symlinks of every kind (relative, absolute, inside,
    outside, dangling, to a file, chains, loops): the names a random path is made of."""
    names = ["a", "b", "c", "f.txt", "g", "fifo", "l1", "l2", "l3", "loop1", "loop2", "self", "up", "out"]
    directories = [root]
    for _ in range(6):
        parent = rng.choice(directories)
        child = parent / rng.choice(["a", "b", "c"])
        child.mkdir(exist_ok=True)
        directories.append(child)
    for directory in directories:
        (directory / "f.txt").write_text("x")
    os.mkfifo(rng.choice(directories) / "fifo")
    outside.mkdir(exist_ok=True)
    (outside / "f.txt").write_text("secret")
    targets = ["f.txt", "a", "a/b", "../f.txt", "..", "missing", "l2", str(outside), str(outside / "f.txt"),
               str(root / "a"), "fifo", "a/f.txt/", "c/../f.txt"]
    for directory in directories:
        for link in ("l1", "l2", "l3", "up", "out"):
            if rng.random() < 0.5 and not (directory / link).is_symlink():
                (directory / link).symlink_to(rng.choice(targets))
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "self").symlink_to("self")
    return names


def _answer(resolve, path: str, strict: bool) -> tuple[str, object]:
    try:
        return "path", resolve(path, strict=strict)
    except OSError as exc:
        return "errno", exc.errno


@pytest.mark.parametrize("seed", range(4))
def test_real_path_answers_as_realpath_does(tmp_path: Path, seed: int) -> None:
    # The kernel's answer must be realpath's, for paths that exist and for paths that do not,
    # through every kind of symlink; where it cannot answer, realpath's own errors come back.
    rng = random.Random(seed)
    root = tmp_path / "ws"
    root.mkdir()
    names = _random_tree(root, tmp_path / "outside", rng)
    components = [*names, "..", ".", "", "missing"]
    answered = 0
    for _ in range(800):
        relative = "/".join(rng.choice(components) for _ in range(rng.randint(1, 5)))
        path = os.path.join(root, relative) + ("/" if rng.random() < 0.1 else "")
        for strict in (True, False):
            expected = _answer(os.path.realpath, path, strict)
            assert _answer(real_path, path, strict) == expected, (path, strict)
            answered += expected[0] == "path"
    assert answered > 400  # most paths resolved: the comparison is not all errors


def test_real_path_asks_the_kernel_for_a_path_that_exists(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to("d")
    os.mkfifo(tmp_path / "d" / "fifo")  # named, never opened for reading: nothing blocks

    real = str(tmp_path.resolve(strict=True) / "d")

    def no_walk(*args, **kwargs):
        raise AssertionError("realpath walked a path the kernel could name")

    monkeypatch.setattr(os.path, "realpath", no_walk)
    assert real_path(tmp_path / "link" / "f", strict=True) == real + "/f"
    assert real_path(str(tmp_path / "link" / ".." / "d" / "fifo")) == real + "/fifo"
