from __future__ import annotations

from pathlib import Path
from typing import Any

from tool_worker.tools import read
from tool_worker.tools.base import ErrorKind


async def test_numbered_lines(call: Any) -> None:
    result = await call("read", file_path="src/app.py")
    assert not result.is_error and not result.truncated
    assert result.output.splitlines()[0] == "     1\tdef load_config(path):"
    assert result.output.splitlines()[3] == "     4\t# TODO: cache it"


async def test_offset_limit_and_continuation(call: Any, workspace: Path) -> None:
    (workspace / "long.txt").write_text("".join(f"line {n}\n" for n in range(1, 3001)))
    first = await call("read", file_path="long.txt")
    lines = first.output.splitlines()
    assert first.truncated and len(lines) == read.DEFAULT_LINE_LIMIT + 1
    assert lines[-1] == "[showing lines 1-2000 of 3000; use offset=2001 to continue]"
    window = await call("read", file_path="long.txt", offset=2999, limit=5)
    assert window.output.splitlines() == ["  2999\tline 2999", "  3000\tline 3000"]
    assert not window.truncated
    past = await call("read", file_path="long.txt", offset=4000)
    assert past.is_error and "3000 lines" in past.output


async def test_long_lines_cut(call: Any, workspace: Path) -> None:
    (workspace / "wide.txt").write_text("x" * 5000 + "\nshort\n")
    result = await call("read", file_path="wide.txt")
    first = result.output.splitlines()[0]
    assert first.startswith("     1\t" + "x" * read.MAX_LINE_CHARS + " [... line cut")
    assert result.truncated and "1 lines longer than 2000 characters were cut" in result.output


async def test_binary_reported_not_dumped(call: Any, workspace: Path) -> None:
    (workspace / "blob.bin").write_bytes(b"\x89PNG\0\0\0" + bytes(range(256)) * 10)
    result = await call("read", file_path="blob.bin")
    assert not result.is_error
    assert "binary file" in result.output and "PNG" not in result.output


async def test_errors(call: Any) -> None:
    missing = await call("read", file_path="nope.txt")
    assert missing.error_kind is ErrorKind.TOOL_ERROR and "file not found: nope.txt" in missing.output
    directory = await call("read", file_path="src")
    assert directory.is_error and "is a directory" in directory.output
    escape = await call("read", file_path="../../etc/passwd")
    assert escape.error_kind is ErrorKind.PATH_ESCAPE


async def test_empty_file(call: Any, workspace: Path) -> None:
    (workspace / "empty.txt").write_text("")
    result = await call("read", file_path="empty.txt")
    assert result.output == "empty.txt is empty."
