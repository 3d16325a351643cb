"""edit: replace an exact string in a file (Execute lane)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.confinement.protected import refuse_protected
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import atomic_write, encode_text, open_regular, run_stoppable

# edit holds a file in memory several times over (its bytes, its text, the changed text and its
# bytes), in the process that runs it: the server's. A file a command made huge for nothing
# (`truncate -s 20G f`) had the kernel's OOM killer end the server; bigger files are refused.
MAX_EDIT_BYTES = 16 * 1024 * 1024

# A line feed that no carriage return precedes.
_BARE_LF = re.compile(r"(?<!\r)\n")


def _edit(target: Path, shown: str, old: str, new: str, replace_all: bool, stop: threading.Event) -> ToolResult:
    if old == new:
        raise ToolFailure("old_string and new_string are identical; nothing to change", ErrorKind.INVALID_ARGUMENTS)
    if not os.path.lexists(target):
        raise ToolFailure(f"file not found: {shown}; use write to create a new file")
    with open_regular(target, shown) as handle:
        # Read no more than the limit even if the file grows after the size was checked.
        size = os.fstat(handle.fileno()).st_size
        raw = b"" if size > MAX_EDIT_BYTES else handle.read(MAX_EDIT_BYTES + 1)
    if max(size, len(raw)) > MAX_EDIT_BYTES:
        raise ToolFailure(
            f"{shown} is {max(size, len(raw)):,} bytes: edit changes files of at most {MAX_EDIT_BYTES:,} bytes; "
            "change a bigger one with a command (sed -i, a script) through bash"
        )
    try:
        # Bytes, not read_text: read_text would turn \r\n into \n and the write would change every line.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ToolFailure(f"{shown} is UTF-16 text; edit changes UTF-8 files only: convert it first "
                              f"(iconv -f UTF-16 -t UTF-8), or write it anew") from exc
        raise ToolFailure(f"{shown} is not UTF-8 text; edit only changes text files") from exc
    count = text.count(old)
    if count == 0 and "\n" in old and "\r\n" in text:
        # read shows a CRLF file's lines without their \r, so text copied from it spans lines with
        # \n alone and would never match: it is looked for, and replaced, with the file's endings.
        as_crlf = _BARE_LF.sub("\r\n", old)
        count = text.count(as_crlf)
        if count:
            old, new = as_crlf, _BARE_LF.sub("\r\n", new)
    if count == 0:
        raise ToolFailure(
            f"old_string was not found in {shown}. It must match the file exactly, including "
            "whitespace and indentation: read the file and copy the text from it."
        )
    if count > 1 and not replace_all:
        raise ToolFailure(
            f"old_string occurs {count} times in {shown}; it must be unique. Add surrounding lines "
            "to old_string to pick one occurrence, or set replace_all=true to replace all of them."
        )
    if count == 1 and not replace_all and text.find(old, text.find(old) + 1) != -1:
        # str.count counts occurrences that do not overlap: "}\n}\n" in "}\n}\n}\n" is one to it.
        raise ToolFailure(
            f"old_string occurs more than once in {shown} (its occurrences overlap); it must be unique. "
            "Add surrounding lines to old_string to pick one occurrence."
        )
    changed = encode_text(text.replace(old, new), "new_string")
    try:
        # A call that timed out or was cancelled while this thread worked must change nothing.
        atomic_write(target, changed, stop)
    except OSError as exc:
        raise ToolFailure(f"cannot write {shown}: {exc.strerror or exc}") from exc
    noun = "occurrence" if count == 1 else "occurrences"
    return ToolResult(output=f"Edited {shown}: replaced {count} {noun}")


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    target = resolve_in_workspace(ctx.workspace, args["file_path"])
    ctx.check_readable(target, args["file_path"])
    refuse_protected(ctx, "edit", (target, args["file_path"]))
    return await run_stoppable(
        _edit,
        target,
        args["file_path"],
        args["old_string"],
        args["new_string"],
        args.get("replace_all", False),
    )


TOOL = Tool(
    spec=ToolSpec(
        name="edit",
        description=(
            "Replace text in an existing file: old_string must occur in the file exactly as given "
            "(whitespace and indentation included) and, unless replace_all is true, exactly once; "
            "include enough surrounding lines to make it unique. Read the file first. The file is "
            "rewritten atomically; line endings and everything else are kept as they are."
        ),
        parameters={
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "minLength": 1, "description": "File to change."},
                "old_string": {"type": "string", "minLength": 1, "description": "Exact text to replace."},
                "new_string": {"type": "string", "description": "Text to put in its place."},
                "replace_all": {
                    "type": "boolean",
                    "description": "Replace every occurrence instead of requiring exactly one (default false).",
                },
            },
            "required": ["file_path", "old_string", "new_string"],
            "additionalProperties": False,
        },
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
    effects=effects.writes("file_path", files=True),
)
