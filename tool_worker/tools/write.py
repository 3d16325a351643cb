"""write: create or overwrite a file with the given content (Execute lane)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.confinement.protected import refuse_protected
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import atomic_write, encode_text, new_parents, run_stoppable

# Content of at most this many characters (most source files) is written on the event loop.
INLINE_WRITE_CHARS = 64 * 1024


def _write(target: Path, shown: str, content: str, stop: threading.Event | None = None) -> ToolResult:
    existed = target.exists()
    data = encode_text(content, "content")
    try:
        with new_parents(target, shown):
            atomic_write(target, data, stop)
    except OSError as exc:
        raise ToolFailure(f"cannot write {shown}: {exc.strerror or exc}") from exc
    verb = "Overwrote" if existed else "Created"
    return ToolResult(output=f"{verb} {shown} ({len(data)} bytes)")


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    target = resolve_in_workspace(ctx.workspace, args["file_path"])
    if args["file_path"].endswith("/"):
        # Resolving drops the slash: a file named like the directory would be written.
        raise ToolFailure(
            f"file_path {args['file_path']!r} ends with '/', so it names a directory: give the path of the file",
            ErrorKind.INVALID_ARGUMENTS,
        )
    refuse_protected(ctx, "write", (target, args["file_path"]))
    if len(args["content"]) <= INLINE_WRITE_CHARS:
        # A few system calls: cheaper than the hop to a thread, whose result the loop would only
        # take back once it is free (a write of 1 KB took 2-6 ms in a busy turn, measured).
        return _write(target, args["file_path"], args["content"])
    return await run_stoppable(_write, target, args["file_path"], args["content"])


TOOL = Tool(
    spec=ToolSpec(
        name="write",
        description=(
            "Write a file in the workspace, replacing it if it exists; missing parent directories "
            "are created. The file is replaced atomically (never left half-written). To change part "
            "of an existing file, prefer edit, which sends only the change. Paths are relative to "
            "the workspace root (absolute paths must be inside it)."
        ),
        parameters={
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "minLength": 1, "description": "File to write."},
                "content": {"type": "string", "description": "The complete new content of the file."},
            },
            "required": ["file_path", "content"],
            "additionalProperties": False,
        },
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
    effects=effects.writes("file_path", files=True),
)
