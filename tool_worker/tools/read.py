"""read: show a text file with line numbers, a window of lines at a time (Query lane)."""

from __future__ import annotations

import contextlib
import errno
import functools
import operator
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tool_worker import effects
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import check_stop, is_binary, open_regular, run_stoppable

DEFAULT_LINE_LIMIT = 2000
MAX_LINE_CHARS = 2000
# Bounds one answer even when every line is near MAX_LINE_CHARS.
MAX_OUTPUT_CHARS = 256_000
BINARY_SNIFF_BYTES = 8192
# The file is read this much at a time: a line of any length costs at most this, plus the part
# of it that is kept (a UTF-8 character is at most 4 bytes).
READ_CHUNK = 64 * 1024
# Past the window, lines are only counted, this many bytes at a time.
_COUNT_CHUNK = 1024 * 1024
_KEPT_LINE_BYTES = 4 * MAX_LINE_CHARS + 4
# A file of at most this many bytes (most source files) is read and shown on the event loop: one
# read() of it costs less than the hop to a thread and back, and a thread reading beside the loop
# makes every system call of the loop wait to take the interpreter back. A bigger file, or one
# that grew past this while it was read, is read in a thread that the call's end can stop.
INLINE_READ_BYTES = 64 * 1024
# A UTF-16 file (told by its byte order mark) is decoded whole: up to this size.
MAX_UTF16_BYTES = 16 * 1024 * 1024
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
UTF16_NOTICE = "[UTF-16 text, shown decoded; edit changes UTF-8 files only]"


def _lines(handle, stop: threading.Event):
    """(kept bytes, was cut) of each line, reading READ_CHUNK at a time: a 200 MB line is never
    held, only its first _KEPT_LINE_BYTES."""
    kept = bytearray()
    cut = False
    while piece := handle.readline(READ_CHUNK):
        check_stop(stop)
        ended = piece.endswith(b"\n")
        room = _KEPT_LINE_BYTES - len(kept)
        if room > 0:
            kept += piece[:room]
        if len(piece) > room:
            cut = True
        if ended:
            yield bytes(kept), cut
            kept.clear()
            cut = False
    if kept or cut:
        yield bytes(kept), cut


def _lines_in(data: bytes):
    """What _lines yields for a file whose bytes are all in `data`, without the line feeds."""
    pieces = data.split(b"\n")
    last = pieces.pop()  # what follows the last line feed: a line only when not empty
    for piece in pieces:
        # The line feed counts towards the kept bytes, as _lines keeps it.
        yield piece[:_KEPT_LINE_BYTES], len(piece) + 1 > _KEPT_LINE_BYTES
    if last:
        yield last[:_KEPT_LINE_BYTES], len(last) > _KEPT_LINE_BYTES


def _binary(shown: str, size: int) -> ToolResult:
    return ToolResult(output=f"{shown} is a binary file ({size} bytes); its content is not shown.")


def _stream(handle: BinaryIO, shown: str, offset: int, limit: int, stop: threading.Event) -> ToolResult:
    """The answer for a file too big to read on the loop, line by line from its start up to the
    window's end, then only counted; closes `handle`, which this thread owns."""
    with handle:
        handle.seek(0)
        return _show(_lines(handle, stop), shown, offset, limit, lambda: _lines_after(handle, stop))


def _lines_after(handle: BinaryIO, stop: threading.Event) -> int:
    """The lines from `handle`'s position to the end of its file, as _lines would count them,
    counted a megabyte at a time: line by line, the count of a log of gigabytes behind a window
    of its first lines cost seconds of CPU. The holes of a sparse file (zeros: no line feed) are
    skipped."""
    descriptor = handle.fileno()
    position, end = handle.tell(), os.fstat(descriptor).st_size
    if position >= end:
        return 0
    feeds = 0
    while position < end:
        try:
            position = os.lseek(descriptor, position, os.SEEK_DATA)
            data_end = min(os.lseek(descriptor, position, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            data_end = end  # a filesystem that cannot tell: all of it is read
        while position < data_end:
            check_stop(stop)
            chunk = os.pread(descriptor, min(_COUNT_CHUNK, data_end - position), position)
            if not chunk:  # the file shrank meanwhile
                return feeds + 1
            feeds += chunk.count(b"\n")
            position += len(chunk)
    # What follows the last line feed (bytes, or zeros of a hole) is a line of its own.
    return feeds + (os.pread(descriptor, 1, end - 1) != b"\n")


def _show(lines_read, shown: str, offset: int, limit: int, count_rest=None) -> ToolResult:
    """The answer for a file whose lines (kept bytes, was cut) `lines_read` yields; `count_rest()`,
    if given, counts the lines after the one last yielded without yielding them."""
    lines: list[str] = []
    size = 0
    cut_lines = 0
    number = 0
    last_shown = offset - 1
    for number, (raw, cut) in enumerate(lines_read, start=1):
        if number < offset:
            continue
        if number >= offset + limit or size >= MAX_OUTPUT_CHARS:
            if count_rest is not None:
                number += count_rest()
                break
            # Keep counting so the notice can say how long the file is.
            continue
        text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if cut or len(text) > MAX_LINE_CHARS:
            text = f"{text[:MAX_LINE_CHARS]} [... line cut at {MAX_LINE_CHARS} characters]"
            cut_lines += 1
        lines.append(f"{number:6}\t{text}")
        size += len(text) + 8
        last_shown = number
    return _answer(lines, number, shown, offset, last_shown, cut_lines)


def _read_utf16(handle: BinaryIO, head: bytes, shown: str, offset: int, limit: int,
                stop: threading.Event) -> ToolResult:
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_UTF16_BYTES:
            raise ToolFailure(f"{shown} is UTF-16 text of {size:,} bytes: more than the {MAX_UTF16_BYTES:,} "
                              "read decodes; convert it to UTF-8 (iconv) to read it, or grep it")
        data = head + handle.read(MAX_UTF16_BYTES + 1 - len(head))
    check_stop(stop)
    return _show_utf16(data, shown, offset, limit)


def _show_utf16(data: bytes, shown: str, offset: int, limit: int) -> ToolResult:
    """A UTF-16 file (its BOM says which order) shown as read shows UTF-8 text, and said to be."""
    text = data.decode("utf-16", "replace")
    result = _show(_lines_in(text.encode("utf-8", "surrogatepass")), shown, offset, limit)
    return ToolResult(output=f"{result.output}\n{UTF16_NOTICE}", truncated=result.truncated,
                      metadata=result.metadata)


def _show_in_memory(data: bytes, shown: str, offset: int, limit: int) -> ToolResult:
    """What _show(_lines_in(data), ...) answers, a few times faster for the usual source file:
    decoded and split whole, with no work per line beyond numbering it.

    Taken only when no line can be cut and the window fits MAX_OUTPUT_CHARS. A line of at most
    MAX_LINE_CHARS characters (\\r included) has at most 4 bytes per character, so with its line feed
    it is within the bytes _lines keeps. Decoding whole gives the lines that decoding each
    line does: a line feed is never part of a UTF-8 sequence, so it ends any invalid one.
    """
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if not lines[-1]:  # what follows the last line feed is a line only when not empty
        lines.pop()
    if lines and max(map(len, lines)) > MAX_LINE_CHARS:
        return _show(_lines_in(data), shown, offset, limit)
    window = lines[offset - 1:offset - 1 + limit]
    if "\r" in text:
        window = [line.rstrip("\r") for line in window]
    if sum(map(len, window)) + 8 * len(window) > MAX_OUTPUT_CHARS:
        return _show(_lines_in(data), shown, offset, limit)
    numbered = list(map(operator.add, _number_prefixes(offset, len(window)), window))
    return _answer(numbered, len(lines), shown, offset, offset + len(window) - 1, 0)


@functools.cache
def _first_prefixes() -> tuple[str, ...]:
    return tuple(f"{number:6}\t" for number in range(1, DEFAULT_LINE_LIMIT + 1))


def _number_prefixes(first: int, count: int) -> Sequence[str]:
    """The prefixes ("     1\\t") of lines first..first+count-1. Formatting a number costs more than
    the rest of a small read's work per line, so the default window's are formatted once."""
    last = first + count - 1
    if last <= DEFAULT_LINE_LIMIT:
        return _first_prefixes()[first - 1:last]
    return [f"{number:6}\t" for number in range(first, last + 1)]


def _answer(numbered: list[str], total: int, shown: str, offset: int, last_shown: int, cut_lines: int) -> ToolResult:
    """The answer showing the `numbered` lines offset..last_shown of a file of `total` lines."""
    if total == 0:
        return ToolResult(output=f"{shown} is empty.")
    if offset > total:
        raise ToolFailure(f"offset {offset} is past the end of {shown}, which has {total} lines")
    notices = []
    if last_shown < total:
        notices.append(f"[showing lines {offset}-{last_shown} of {total}; use offset={last_shown + 1} to continue]")
    if cut_lines:
        notices.append(f"[{cut_lines} lines longer than {MAX_LINE_CHARS} characters were cut]")
    output = "\n".join(numbered + notices)
    return ToolResult(output=output, truncated=bool(notices), metadata={"total_lines": total})


def _small_file(workspace: Path, args: dict[str, Any]) -> bool:
    """A regular file of at most INLINE_READ_BYTES: read and answered on the server's event loop
    in less time, and less of the server's CPU, than sending the call to a worker takes."""
    try:
        info = os.stat(resolve_in_workspace(workspace, args["file_path"]))
    except (ToolFailure, OSError, KeyError, TypeError, ValueError):
        return False  # the worker answers it, as it would any other
    return stat.S_ISREG(info.st_mode) and info.st_size <= INLINE_READ_BYTES


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    path = resolve_in_workspace(ctx.workspace, args["file_path"])
    ctx.check_readable(path, args["file_path"])
    offset = args.get("offset", 1)
    limit = args.get("limit", DEFAULT_LINE_LIMIT)
    shown = args["file_path"]
    with contextlib.ExitStack() as owned:
        handle = owned.enter_context(open_regular(path, shown))
        # At least the bytes binary files are told by, whatever the inline limit.
        head = handle.read(max(INLINE_READ_BYTES + 1, BINARY_SNIFF_BYTES))
        small = len(head) <= INLINE_READ_BYTES
        if head.startswith(_UTF16_MARKS):
            # Its NUL bytes read as binary, where grep (rg decodes it) shows its lines.
            if small:
                return _show_utf16(head, shown, offset, limit)
            owned.pop_all()
            return await run_stoppable(_read_utf16, handle, head, shown, offset, limit)
        if is_binary(head[:BINARY_SNIFF_BYTES]):
            return _binary(shown, len(head) if small else os.fstat(handle.fileno()).st_size)
        if small:
            return _show_in_memory(head, shown, offset, limit)
        # The thread reads on from the same open file, and closes it (were the call cancelled
        # before the thread started, dropping its work item closes it).
        owned.pop_all()
    return await run_stoppable(_stream, handle, shown, offset, limit)


TOOL = Tool(
    spec=ToolSpec(
        name="read",
        description=(
            "Read a text file of the workspace. Lines are numbered like `cat -n` (number, tab, line); "
            "the numbers are not part of the file, so leave them out of edit's old_string.\n"
            f"- Shows up to {DEFAULT_LINE_LIMIT} lines from offset (1-based line number, default 1); "
            "for a long file, read a window with offset and limit. When more lines follow, the "
            "output ends with the offset to continue from.\n"
            f"- Lines longer than {MAX_LINE_CHARS} characters are cut.\n"
            "- Binary files are reported, not shown; UTF-16 text (with its byte order mark) is shown "
            "decoded. Use ls or list_files for directories.\n"
            "- Paths are relative to the workspace root (absolute paths must be inside it)."
        ),
        parameters={
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "minLength": 1, "description": "File to read."},
                "offset": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "First line to show, 1-based (default 1).",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "description": f"How many lines to show (default {DEFAULT_LINE_LIMIT}).",
                },
            },
            "required": ["file_path"],
            "additionalProperties": False,
        },
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_run,
    effects=effects.reads(("file_path", None)),
    cheaper_here=_small_file,
)
