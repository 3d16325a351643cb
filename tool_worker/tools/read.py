"""read: show a text file with line numbers, a window of lines at a time (Query lane)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

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
_KEPT_LINE_BYTES = 4 * MAX_LINE_CHARS + 4


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


def _read(path: Path, shown: str, offset: int, limit: int, stop: threading.Event) -> ToolResult:
    with open_regular(path, shown) as handle:
        if is_binary(handle.read(BINARY_SNIFF_BYTES)):
            size = os.fstat(handle.fileno()).st_size
            return ToolResult(output=f"{shown} is a binary file ({size} bytes); its content is not shown.")
        handle.seek(0)
        lines: list[str] = []
        size = 0
        cut_lines = 0
        number = 0
        last_shown = offset - 1
        for number, (raw, cut) in enumerate(_lines(handle, stop), start=1):
            if number < offset or number >= offset + limit or size >= MAX_OUTPUT_CHARS:
                # Keep counting so the notice can say how long the file is.
                continue
            text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if cut or len(text) > MAX_LINE_CHARS:
                text = f"{text[:MAX_LINE_CHARS]} [... line cut at {MAX_LINE_CHARS} characters]"
                cut_lines += 1
            lines.append(f"{number:6}\t{text}")
            size += len(text) + 8
            last_shown = number
    total = number
    if total == 0:
        return ToolResult(output=f"{shown} is empty.")
    if offset > total:
        raise ToolFailure(f"offset {offset} is past the end of {shown}, which has {total} lines")
    notices = []
    if last_shown < total:
        notices.append(f"[showing lines {offset}-{last_shown} of {total}; use offset={last_shown + 1} to continue]")
    if cut_lines:
        notices.append(f"[{cut_lines} lines longer than {MAX_LINE_CHARS} characters were cut]")
    output = "\n".join(lines + notices)
    return ToolResult(output=output, truncated=bool(notices), metadata={"total_lines": total})


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    path = resolve_in_workspace(ctx.workspace, args["file_path"])
    ctx.check_readable(path, args["file_path"])
    offset = args.get("offset", 1)
    limit = args.get("limit", DEFAULT_LINE_LIMIT)
    return await run_stoppable(_read, path, args["file_path"], offset, limit)


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
            "- Binary files are reported, not shown. Use ls or list_files for directories.\n"
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
)
