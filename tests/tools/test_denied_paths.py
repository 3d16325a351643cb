"""Denied paths: tools refuse to read them and leave them out of listings and search results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tool_worker.denied import DeniedPaths, globs_within
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind, ToolResult
from tool_worker.tools.globs import expand_braces

DENY = ("**/*.env", "secrets/**")


@pytest.fixture
def secret_workspace(workspace: Path) -> Path:
    (workspace / "app.env").write_text("API_KEY=hunter2\n")
    (workspace / "src" / "local.env").write_text("TOKEN=hunter2\n")
    (workspace / "secrets").mkdir()
    (workspace / "secrets" / "key.txt").write_text("hunter2 private key\n")
    (workspace / "notes.txt").write_text("hunter2 is the example password in notes\n")
    os.symlink("secrets/key.txt", workspace / "innocent.txt")
    os.symlink("secrets", workspace / "vault")
    return workspace


async def run(registry: ToolRegistry, workspace: Path, tool: str, denied=DENY, **arguments) -> ToolResult:
    return await registry.execute(tool, workspace, json.dumps(arguments), denied)


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("grep", {"pattern": "hunter2"}),
        ("grep", {"pattern": "hunter2", "output_mode": "content"}),
        ("grep", {"pattern": "hunter2", "output_mode": "count"}),
        ("search", {"query": "hunter2"}),
        ("glob", {"pattern": "**/*"}),
        ("list_files", {}),
        ("ls", {}),
    ],
)
async def test_listings_leave_denied_paths_out(registry, secret_workspace, tool, arguments) -> None:
    result = await run(registry, secret_workspace, tool, **arguments)
    assert not result.is_error, result.output
    for hidden in ("app.env", "local.env", "key.txt", "private key", "innocent.txt", "API_KEY", "TOKEN"):
        assert hidden not in result.output, (tool, result.output)
    assert "left out: this session's permission policy denies reading them" in result.output
    if tool in ("grep", "search"):
        assert "notes.txt" in result.output
    # Without the policy everything is there: the filter, not the fixture, hid them.
    open_result = await run(registry, secret_workspace, tool, (), **arguments)
    assert "left out" not in open_result.output
    assert "app.env" in open_result.output or tool in ("list_files", "glob", "search")


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("read", {"file_path": "app.env"}),
        ("read", {"file_path": "innocent.txt"}),  # a link to a denied file
        ("read", {"file_path": "vault/key.txt"}),  # through a link to a denied directory
        ("read", {"file_path": "./src/../secrets/key.txt"}),
        ("ls", {"path": "secrets"}),
        ("ls", {"path": "vault"}),
        ("grep", {"pattern": "x", "path": "secrets"}),
        ("search", {"query": "key", "path": "vault"}),
        ("list_files", {"path": "secrets"}),
        ("glob", {"pattern": "*", "path": "vault"}),
        ("copy", {"source": "secrets/key.txt", "destination": "out.txt"}),
        ("edit", {"file_path": "app.env", "old_string": "API", "new_string": "X"}),
    ],
)
async def test_reading_a_denied_path_is_refused(registry, secret_workspace, tool, arguments) -> None:
    result = await run(registry, secret_workspace, tool, **arguments)
    assert result.error_kind is ErrorKind.PERMISSION_DENIED, result.output
    assert "hunter2" not in result.output


async def test_absolute_paths_are_checked_too(registry, secret_workspace) -> None:
    result = await run(registry, secret_workspace, "read", file_path=str(secret_workspace / "app.env"))
    assert result.error_kind is ErrorKind.PERMISSION_DENIED


async def test_a_copied_tree_leaves_denied_files_behind(registry, secret_workspace) -> None:
    result = await run(registry, secret_workspace, "copy", source="src", destination="src_copy")
    assert not result.is_error and "were not copied" in result.output
    assert (secret_workspace / "src_copy" / "app.py").exists()
    assert not (secret_workspace / "src_copy" / "local.env").exists()


def test_a_directory_denies_everything_under_it(tmp_path: Path) -> None:
    denied = DeniedPaths(["build", "docs/*.md"])
    assert denied.matching("build") == "build"
    assert denied.matching("build/deep/file.o") == "build"
    assert denied.matching("docs/a.md") == "docs/*.md"
    assert denied.matching("docs/sub/a.md") is None
    assert denied.matching("src/build.py") is None
    assert not DeniedPaths() and DeniedPaths().denies(str(tmp_path), "anything") is None


@pytest.mark.parametrize("mode", ["content", "count"])
async def test_a_denied_file_named_with_empty_lines_stays_hidden_in_grep(registry, secret_workspace, mode) -> None:
    # Named so that its last line, read alone, is a name no rule denies.
    (secret_workspace / "secrets" / "x\n\nplain.txt").write_text("hunter2 behind a crafted name\n")
    result = await run(registry, secret_workspace, "grep", pattern="crafted", output_mode=mode)
    assert "plain.txt" not in result.output
    assert "behind a crafted name" not in result.output
    assert "1 entry left out" in result.output


async def test_a_binary_file_named_with_empty_lines_lends_its_name_to_no_other_file(registry, secret_workspace) -> None:
    # rg's warning after a match in a binary file repeats its name: with an empty line in it, the
    # file rg printed next was shown under a made-up name that no rule denies (a denied file's
    # lines too, when it came next).
    (secret_workspace / "a\n\nplain").write_bytes(b"hunter2 decoy\n" + b"x" * 70_000 + b"\0\n")
    (secret_workspace / "secrets" / "deep.txt").write_bytes(b"x\n" * 200_000 + b"hunter2 deep secret\n")
    result = await run(registry, secret_workspace, "grep", pattern="hunter2", output_mode="content")
    assert result.output.split("\n") == [
        "a", "", "plain:1:hunter2 decoy",
        "a", "", 'plain: WARNING: stopped searching binary file after match (found "\\0" byte around offset 70014)',
        "notes.txt:1:hunter2 is the example password in notes",
        "[4 entries left out: this session's permission policy denies reading them]",
    ]


@pytest.mark.parametrize(
    ("glob", "deny", "allow"),
    [
        ("/home/me/ws/src/**", ("src/**",), ("src/**",)),
        ("/home/me/ws/*.env", ("*.env",), ("*.env",)),
        ("/home/*/ws/.env", (".env",), (".env",)),
        ("/home/**/ws/x", ("**/ws/x", "x"), ("**/ws/x", "x")),
        ("/home/{me/ws/a,you/ws/b,me/ws/c/d}", ("a", "c/d"), ("a", "c/d")),
        ("/home/me/ws", ("**",), (".",)),  # the workspace: all of it, or only the directory
        ("/home/me", ("**",), ()),  # above it
        ("/**", ("**",), ("**",)),
        ("/etc/**", (), ()),
        ("/home/me/wsx/a", (), ()),
    ],
)
def test_an_absolute_glob_is_placed_in_a_workspace(glob: str, deny: tuple, allow: tuple) -> None:
    assert globs_within(glob, "/home/me/ws", covering=True) == deny
    assert globs_within(glob, "/home/me/ws", covering=False) == allow


def test_braces_expand_as_the_glob_reads_them() -> None:
    assert expand_braces("/a/{b,c/{d,e}}/x{1,2}", 10) == [
        "/a/b/x1", "/a/b/x2", "/a/c/d/x1", "/a/c/d/x2", "/a/c/e/x1", "/a/c/e/x2"]
    assert expand_braces("a{b", 10) == ["a{b"]  # no closing brace: a literal `{`
    assert expand_braces("[{]a,b}", 10) == ["[{]a,b}"]  # in a class
    assert expand_braces("\\{a,b}", 10) == ["\\{a,b}"]  # escaped
    assert expand_braces("{a,b}" * 3, 8) is not None and expand_braces("{a,b}" * 4, 8) is None
    assert expand_braces("{a}" * 5000, 1) == ["a" * 5000]  # braces in a row, not nested: no recursion
