"""glob, ls and list_files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import glob, list_files, ls
from tool_worker.tools.base import ErrorKind
from tool_worker.tools.globs import glob_to_regex


async def test_glob_newest_first_and_gitignore(call: Any, workspace: Path) -> None:
    os.utime(workspace / "src" / "app.py", (1_000, 1_000))
    os.utime(workspace / "src" / "pkg" / "util.py", (2_000, 2_000))
    result = await call("glob", pattern="*.py")
    # build/out.py is ignored by .gitignore, even though it matches.
    assert result.output.splitlines() == ["src/pkg/util.py", "src/app.py"]


async def test_glob_ties_by_path_and_relative_pattern(call: Any, workspace: Path) -> None:
    for name in ("b.py", "a.py", "c.py"):
        (workspace / "src" / name).write_text("")
        os.utime(workspace / "src" / name, (5_000, 5_000))
    os.utime(workspace / "src" / "app.py", (5_000, 5_000))
    os.utime(workspace / "src" / "pkg" / "util.py", (1_000, 1_000))
    result = await call("glob", pattern="*.py", path="src")
    assert result.output.splitlines() == ["src/a.py", "src/app.py", "src/b.py", "src/c.py", "src/pkg/util.py"]
    nested = await call("glob", pattern="pkg/*.{py,js}", path="src")
    assert sorted(nested.output.splitlines()) == ["src/pkg/util.py", "src/pkg/web.js"]


async def test_a_pattern_starting_with_dot_slash_is_relative_to_the_path(call: Any) -> None:
    # "./src/*.py" matched nothing, silently (a path never starts with "./"), and so did grep's
    # glob: the model concluded there were no such files.
    assert (await call("glob", pattern="./src/*.py")).output == "src/app.py"
    assert (await call("glob", pattern="./*.py", path="src")).output == "src/app.py"
    found = await call("grep", pattern="load_config", glob="./src/**/*.py")
    assert found.output.splitlines() == ["src/app.py", "src/pkg/util.py"]


async def test_glob_limit(call: Any, workspace: Path) -> None:
    many = workspace / "many"
    many.mkdir()
    for index in range(glob.MAX_RESULTS + 20):
        (many / f"f{index:03}.txt").write_text("")
    result = await call("glob", pattern="many/*.txt")
    lines = result.output.splitlines()
    assert result.truncated and len(lines) == glob.MAX_RESULTS + 1
    assert lines[-1].startswith(f"[showing the {glob.MAX_RESULTS} newest of {glob.MAX_RESULTS + 20}")


async def test_glob_no_match_and_errors(call: Any) -> None:
    assert (await call("glob", pattern="*.rs")).output == "No files match '*.rs' in ."
    assert (await call("glob", pattern="*", path="../..")).error_kind is ErrorKind.PATH_ESCAPE
    assert (await call("glob", pattern="*", path="README.md")).is_error
    for bad in ("[z-a].py", "*[z-a]*.py"):  # re's error, then RE2's (two wildcards)
        result = await call("glob", pattern=bad)
        assert result.error_kind is ErrorKind.INVALID_ARGUMENTS and "is not a glob" in result.output, result


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("*.py", ["a.py", "x/y/a.py"], ["a.pyc", "py"]),
        ("src/**/*.py", ["src/a.py", "src/x/y/a.py"], ["a/src/a.py"]),
        ("**/test_*.py", ["test_a.py", "t/test_a.py"], ["t/atest_a.py"]),
        ("*.{ts,tsx}", ["a.ts", "b/a.tsx"], ["a.js"]),
        ("a[bc].py", ["ab.py", "x/ac.py"], ["ad.py"]),
        ("[!a]*.py", ["b.py"], ["a.py"]),
        ("/top.py", ["top.py"], ["x/top.py"]),
        ("sub/*.py", ["sub/a.py"], ["sub/x/a.py", "x/sub/a.py"]),
        ("a?.py", ["ab.py"], ["a/.py", "abc.py"]),
        # `./` names the search directory, as a leading `/` does.
        ("./*.py", ["a.py"], ["x/a.py"]),
        ("./src/**/*.py", ["src/a.py", "src/x/a.py"], ["a/src/a.py"]),
    ],
)
def test_glob_rules(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = glob_to_regex(pattern)
    assert all(regex.fullmatch(path) for path in matches)
    assert not any(regex.fullmatch(path) for path in misses)


async def test_ls(call: Any, workspace: Path) -> None:
    result = await call("ls")
    assert result.output.splitlines() == ["build/", "src/", ".gitignore", "README.md", "debug.log"]
    ignored = await call("ls", path="src/pkg", ignore=["*.js"])
    assert ignored.output == "util.py"



async def test_ls_ignore_patterns_written_as_ls_shows_directories_or_as_gitignore_does(
    call: Any, workspace: Path
) -> None:
    # `build/` (as ls shows it) and `**/build` (as gitignore writes it) matched no name.
    (workspace / "src" / "build.txt").write_text("a file\n")
    for ignore in (["build/"], ["**/build"], ["build"]):
        assert "build/" not in (await call("ls", ignore=ignore)).output.splitlines(), ignore
    assert (await call("ls", path="src", ignore=["build*/"])).output.splitlines() == ["pkg/", "app.py", "build.txt"]


async def test_ls_limit_and_errors(call: Any, workspace: Path) -> None:
    big = workspace / "big"
    big.mkdir()
    for index in range(ls.MAX_ENTRIES + 5):
        (big / f"{index:05}").write_text("")
    result = await call("ls", path="big")
    assert result.truncated and result.output.splitlines()[-1].startswith(f"[showing {ls.MAX_ENTRIES} of")
    assert "directory not found" in (await call("ls", path="nope")).output
    assert "is a file" in (await call("ls", path="README.md")).output
    assert (await call("ls", path="/")).error_kind is ErrorKind.PATH_ESCAPE


async def test_list_files(call: Any) -> None:
    result = await call("list_files")
    assert result.output.splitlines() == ["README.md", "src/app.py", "src/pkg/util.py", "src/pkg/web.js"]
    shallow = await call("list_files", path="src", max_depth=1)
    assert shallow.output.splitlines() == ["src/app.py"]


async def test_list_files_limit(call: Any, workspace: Path) -> None:
    many = workspace / "many"
    many.mkdir()
    for index in range(list_files.MAX_ENTRIES + 1):
        (many / f"{index:05}.txt").write_text("")
    result = await call("list_files", path="many")
    lines = result.output.splitlines()
    assert result.truncated and lines[0] == "many/00000.txt" and len(lines) == list_files.MAX_ENTRIES + 1
    assert lines[-1].startswith(f"[showing the first {list_files.MAX_ENTRIES} of {list_files.MAX_ENTRIES + 1}")


async def test_list_files_of_a_big_listing_answers_as_a_small_one(call: Any, workspace: Path) -> None:
    # rg's listing past ANSWER_ON_LOOP_BYTES is sorted and cut in a thread.
    for n in range(3_000):
        (workspace / f"f{n:05}-{'x' * 80}.txt").write_text("")
    result = await call("list_files")
    assert not result.is_error and result.truncated, result.output
    assert result.output.splitlines()[0] == "README.md" and result.metadata["files"] >= 3_000
    assert result.output.splitlines()[-1].startswith(f"[showing the first {list_files.MAX_ENTRIES} of ")
