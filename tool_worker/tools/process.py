"""Run a command for bash and execute: own process group, bounded output, timeout, cancellation.

The command gets a new session (`start_new_session=True`), so it and everything it spawns share
one process group that can be killed as a whole: on timeout, on cancellation of the call, and
when the command itself has finished (background processes do not outlive their call).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tool_worker.tools.base import ErrorKind, ToolFailure, ToolResult

DEFAULT_TIMEOUT_MS = 120_000
MAX_TIMEOUT_MS = 600_000
# Output beyond this is cut from the middle: the start says what ran, the end how it ended.
MAX_OUTPUT_CHARS = 30_000
# After the command exits, how long output still in flight may take to arrive.
_DRAIN_SECONDS = 0.5
_READ_CHUNK = 64 * 1024

TIMEOUT_SCHEMA: dict[str, Any] = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_TIMEOUT_MS,
    "description": f"Timeout in milliseconds (default {DEFAULT_TIMEOUT_MS}, max {MAX_TIMEOUT_MS}).",
}


class _HeadTail:
    """Keeps the first and last characters of a stream, counting what falls in between."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head: list[str] = []
        self._head_len = 0
        self._tail = ""
        self.total = 0

    def feed(self, text: str) -> None:
        self.total += len(text)
        room = self._head_limit - self._head_len
        if room > 0:
            self._head.append(text[:room])
            self._head_len += min(room, len(text))
            text = text[room:]
        if text:
            self._tail = (self._tail + text)[-self._tail_limit :]

    @property
    def omitted(self) -> int:
        return self.total - self._head_len - len(self._tail)

    def text(self) -> str:
        head = "".join(self._head)
        if not self.omitted:
            return head + self._tail
        return (
            f"{head}\n\n... [{self.omitted} characters omitted from the middle of the output; "
            f"redirect to a file and read or grep it to see everything] ...\n\n{self._tail}"
        )


@dataclass(frozen=True)
class _Outcome:
    output: str
    omitted: int
    exit_code: int | None
    timed_out: bool


async def run_command(argv: Sequence[str], cwd: Path, timeout_ms: int) -> ToolResult:
    """Run `argv` in `cwd` and report merged stdout+stderr, exit code, truncation and timeout.

    A non-zero exit code is an error result (TOOL_ERROR), a timeout a TIMEOUT result carrying
    the output produced until then.
    """
    outcome = await _run(argv, cwd, timeout_ms / 1000)
    output = outcome.output.rstrip("\n") or "(no output)"
    common: dict[str, Any] = {"exit_code": outcome.exit_code, "truncated": outcome.omitted > 0}
    if outcome.timed_out:
        return ToolResult.error(
            ErrorKind.TIMEOUT,
            f"{output}\n\n[timed out after {timeout_ms} ms; the command and its child processes were killed]",
            **common,
        )
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return ToolResult.error(ErrorKind.TOOL_ERROR, f"{output}\n\n[killed by signal {-outcome.exit_code}]", **common)
    if outcome.exit_code != 0:
        return ToolResult.error(ErrorKind.TOOL_ERROR, f"{output}\n\n[exit code {outcome.exit_code}]", **common)
    return ToolResult(output=output, **common)


async def _run(argv: Sequence[str], cwd: Path, limit_seconds: float) -> _Outcome:
    # Our own pipe rather than stdout=PIPE: Process.wait() also waits for PIPE pipes to close,
    # which a background child holding them would delay indefinitely; and a transport we own
    # can be closed even if a process that left the group keeps the write end open.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_fd)
        # exc.filename tells a missing program from a missing working directory.
        raise ToolFailure(f"cannot run {argv[0]}: {exc.strerror}: {exc.filename}") from exc
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport: asyncio.ReadTransport | None = None
    reader: asyncio.Task[None] | None = None
    capture = _HeadTail(MAX_OUTPUT_CHARS)
    timed_out = False
    try:
        stream = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), pipe
        )
        reader = asyncio.create_task(_pump(stream, capture))
        async with asyncio.timeout(limit_seconds):
            await proc.wait()
            # Output written just before the exit may still be in the pipe; background
            # processes holding the pipe open must not keep the call waiting.
            await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
    except TimeoutError:
        # The deadline may also pass while draining the pipe of a command that did finish.
        timed_out = proc.returncode is None
    finally:
        _kill_group(proc.pid)
        if reader is not None and not reader.done():
            # The group is dead so the pipe is at EOF, unless a process escaped it with setsid.
            await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
            reader.cancel()
            await asyncio.wait({reader})
        if transport is not None:
            transport.close()
        else:
            pipe.close()
        await proc.wait()
    return _Outcome(capture.text(), capture.omitted, None if timed_out else proc.returncode, timed_out)


async def _pump(stream: asyncio.StreamReader, capture: _HeadTail) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await stream.read(_READ_CHUNK):
        capture.feed(decoder.decode(chunk))
    capture.feed(decoder.decode(b"", final=True))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
