from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import read
from tool_worker.tools.base import ErrorKind, ToolFailure


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


CONTENTS = [
    b"",
    b"one\ntwo",
    b"a\r\nb\r\n\r\n",
    b"\n\n\n",
    b"a\rb\rc",
    b"\xff\xfe not utf-8\n\xc3",
    "é".encode() * 4100 + b"\nafter\n",
    b"x" * 8003 + b"\n" + b"y" * 8004 + b"\n" + b"z" * 8005 + b"\nw" + b"v" * 8004,
    # Lines at the edge of the bytes kept of a line, whose kept part is at most 2000 characters.
    "😀".encode() * 1999 + b"\r" * 8 + b"\n" + "😀".encode() * 1999 + b"\r" * 7 + b"\n",
    b"nul later " * 1000 + b"\0\n",
    b"nul early\0\n",
]


async def test_a_small_file_read_on_the_event_loop_reads_as_the_streaming_read(
    call: Any, workspace: Path, monkeypatch: Any
) -> None:
    # Files of at most INLINE_READ_BYTES are read in one piece on the loop, larger ones line by
    # line in a thread: the same file must read the same either way.
    for index, content in enumerate(CONTENTS):
        assert len(content) <= read.INLINE_READ_BYTES
        (workspace / f"case{index}.txt").write_bytes(content)
    windows = [{}, {"offset": 2, "limit": 1}, {"offset": 3, "limit": 5}]
    inline = [[(await call("read", file_path=f"case{i}.txt", **w)).output for w in windows]
              for i in range(len(CONTENTS))]
    monkeypatch.setattr(read, "INLINE_READ_BYTES", 0)
    streamed = [[(await call("read", file_path=f"case{i}.txt", **w)).output for w in windows]
                for i in range(len(CONTENTS))]
    assert inline == streamed
    assert "binary file (11 bytes)" in inline[-1][0] and "binary" not in inline[-2][0]


async def test_a_file_larger_than_the_inline_limit_is_read_whole(call: Any, workspace: Path) -> None:
    lines = [f"{n:05} " + "x" * 100 for n in range(1, 1001)]
    (workspace / "big.txt").write_text("\n".join(lines) + "\n")
    assert (workspace / "big.txt").stat().st_size > read.INLINE_READ_BYTES
    result = await call("read", file_path="big.txt", offset=999)
    assert result.output.splitlines() == [f"   999\t{lines[998]}", f"  1000\t{lines[999]}"]


def _answer_of(show: Any, data: bytes, offset: int, limit: int) -> tuple[str, str]:
    try:
        result = show(data, offset, limit)
    except ToolFailure as exc:
        return ("failure", str(exc))
    return (result.output, repr((result.truncated, result.metadata)))


def test_the_in_memory_answer_is_the_line_by_line_answer() -> None:
    # _show_in_memory skips the per-line work where no line can be cut: on any bytes and window
    # it must answer what the line-by-line reading answers.
    pieces = [b"a", b"xyz", b"\n", b"\r", b"\r\n", "é".encode(), "😀".encode(), b"\xff", b"\xe2\x82", b"\0",
              b"y" * 1999, b"z" * 2001, "😀".encode() * 500, b"\n" * 40]
    rng = random.Random(15)
    contents = [b"\n" * read.INLINE_READ_BYTES, b"w\n" * 20_000] + [
        b"".join(rng.choices(pieces, k=rng.randrange(0, 60))) for _ in range(400)
    ]
    for data in contents:
        windows = [(1, read.DEFAULT_LINE_LIMIT), (1, 10**6), (2, 3), (1999, 4),
                   (rng.randrange(1, 40), rng.randrange(1, 9))]
        for offset, limit in windows:
            fast = _answer_of(lambda d, o, n: read._show_in_memory(d, "f.txt", o, n), data, offset, limit)
            slow = _answer_of(lambda d, o, n: read._show(read._lines_in(d), "f.txt", o, n), data, offset, limit)
            assert fast == slow, (data[:80], offset, limit)


def _streamed(path: Path, offset: int, limit: int) -> tuple[str, str]:
    return _answer_of(lambda d, o, n: read._stream(path.open("rb"), "f.txt", o, n, threading.Event()), b"",
                      offset, limit)


def test_a_streamed_read_counts_the_lines_after_its_window_as_it_shows_them(tmp_path: Path) -> None:
    # Past its window a streamed read counts the file's lines a megabyte at a time (it read
    # every line, at seconds of CPU for a log of gigabytes): the totals must be the same.
    pieces = [b"a", b"\n", b"\r\n", b"\xff", b"\0", b"y" * 9000, "\U0001f600".encode(), b"\n" * 40]
    rng = random.Random(8)
    contents = [b"w\n" * 20_000, b"w\n" * 20_000 + b"tail"] + [
        b"".join(rng.choices(pieces, k=rng.randrange(0, 80))) for _ in range(150)
    ]
    path = tmp_path / "f.txt"
    for data in contents:
        path.write_bytes(data)
        for offset, limit in [(1, 1), (1, 5), (3, 2), (rng.randrange(1, 50), rng.randrange(1, 9))]:
            whole = _answer_of(lambda d, o, n: read._show(read._lines_in(d), "f.txt", o, n), data, offset, limit)
            assert _streamed(path, offset, limit) == whole, (data[:80], offset, limit)


@pytest.mark.parametrize("tail", [b"", b"last\n", b"last"], ids=["hole-last", "line-feed-last", "text-last"])
def test_a_sparse_file_counts_its_holes_as_the_bytes_they_read_as(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "sparse.log"
    with path.open("wb") as f:
        f.write(b"one\ntwo\nthree\n")
        f.truncate(64 * 1024 * 1024)  # a hole of zeros
        f.seek(0, 2)
        f.write(tail)
    # Counted as the bytes read: 3 lines, then the zeros and the tail after them are one more.
    assert _streamed(path, 1, 2)[0].endswith("[showing lines 1-2 of 4; use offset=3 to continue]")
