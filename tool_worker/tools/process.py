"""Run a command for bash and execute: sandboxed, bounded output, timeout, cancellation.

The command runs under the session's sandbox policy (`tool_worker.confinement`): in a PID
namespace of its own, so everything it starts, `setsid` included, is killed as a whole: on
timeout, on cancellation of the call, and when the command itself has finished (background
processes do not outlive their call).
"""

from __future__ import annotations

import asyncio
import codecs
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tool_worker.confinement.launcher import RunningCommand, SandboxUnavailable
from tool_worker.confinement.policy import Limit, SandboxPolicy
from tool_worker.confinement.protected import absent_git_redirects, off_the_loop_if_submodules, remove_planted
from tool_worker.tools.base import ErrorKind, ToolContext, ToolFailure, ToolResult, call_deadline

DEFAULT_TIMEOUT_MS = 120_000
MAX_TIMEOUT_MS = 600_000
# Output beyond this is cut from the middle: the start says what ran, the end how it ended.
MAX_OUTPUT_CHARS = 30_000
# After the command exits, how long output still in flight may take to arrive.
_DRAIN_SECONDS = 0.5
# What ending a command takes once its time is up: the kill, then the output still in flight
# (_DRAIN_SECONDS, twice at most). A call's own deadline (call_deadline) ends the command this much
# before it (half of what is left, when that is less), so that its output so far is returned rather
# than cut off with the call.
_WIND_DOWN_SECONDS = 2 * _DRAIN_SECONDS
_READ_CHUNK = 64 * 1024
# Linux's limits on what execve takes: one argument at most 32 pages (MAX_ARG_STRLEN, its NUL
# included), all of them with the environment at most ARG_MAX. Past them the command fails with
# "Argument list too long" (exit 126), which names neither the limit nor what to do instead.
MAX_ARGUMENT_BYTES = 32 * 4096 - 1
# What the arguments may take of ARG_MAX: the rest is left to the command's environment.
_ENVIRONMENT_ROOM = 64 * 1024

# What the model is told about the sandbox (the session's mode may relax or tighten it).
SANDBOX_NOTE = (
    "- It runs in a sandbox (unless the session turned it off): it can write only inside the workspace "
    "and /tmp (private to this call, emptied after it), .git/hooks and .git/config are read-only, there "
    "is no network, the environment holds only PATH, HOME, LANG, TERM, TMPDIR and the session's own "
    "variables, and processes, memory, CPU time and open files are limited; a result says which limit "
    "stopped a command."
)

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
    limits_hit: list[Limit]


def check_argument(argument: str, what: str) -> int:
    """The argument's size in bytes; ToolFailure (INVALID_ARGUMENTS) when execve takes no argument
    that long. `what` names it for the model ("the command", "argument 3")."""
    size = len(argument.encode("utf-8", "surrogateescape"))
    if size > MAX_ARGUMENT_BYTES:
        raise ToolFailure(
            f"{what} is {size:,} bytes: the system runs no command with an argument over {MAX_ARGUMENT_BYTES:,} "
            "bytes; write it to a file (the write tool) and pass the file's path instead",
            ErrorKind.INVALID_ARGUMENTS,
        )
    return size


def _check_argv_size(argv: Sequence[str]) -> None:
    """ToolFailure (INVALID_ARGUMENTS) for arguments longer than execve takes."""
    total = sum(check_argument(argument, f"argument {index}") + 1 for index, argument in enumerate(argv))
    room = os.sysconf("SC_ARG_MAX") - _ENVIRONMENT_ROOM
    if total > room:
        raise ToolFailure(
            f"the arguments total {total:,} bytes: the system runs no command with more than {room:,}; "
            "write them to a file (the write tool) and pass its path",
            ErrorKind.INVALID_ARGUMENTS,
        )


_LIMIT_TEXT = {
    Limit.PROCESSES: "the process limit ({limits.processes} processes) was reached: forks failed",
    Limit.MEMORY: "the memory limit ({memory}) was reached: the kernel killed a process",
    Limit.CPU_TIME: "a process used up its CPU-time limit ({limits.cpu_seconds} s) and was killed (SIGXCPU)",
}


async def run_command(argv: Sequence[str], ctx: ToolContext, timeout_ms: int) -> ToolResult:
    """Run `argv` in the workspace under the session's sandbox policy and report merged
    stdout+stderr, exit code, truncation, timeout, and the resource limits that stopped it.

    A non-zero exit code is an error result (TOOL_ERROR), a timeout a TIMEOUT result carrying
    the output produced until then; a limit makes it RESOURCE_LIMIT, whatever else happened. A
    policy the host cannot enforce is a SANDBOX_UNAVAILABLE result, and nothing runs.
    """
    _check_argv_size(argv)
    guarded = []
    if ctx.policy.confined and ctx.policy.writes_workspace:
        guarded = await off_the_loop_if_submodules(ctx.workspace, absent_git_redirects, ctx.workspace)
    limit, stopped_by = timeout_ms / 1000, f"after {timeout_ms} ms"
    deadline = call_deadline.get()
    if deadline is not None:
        left = deadline - asyncio.get_running_loop().time()
        # Half of a short limit at most: taken whole from a limit of 1 s, every command (even
        # `true`) was killed at once.
        left -= min(_WIND_DOWN_SECONDS, left / 2)
        if left < limit:
            limit, stopped_by = max(left, 0.0), "at the time limit the session sets for a call"
    try:
        outcome = await _run(argv, ctx, limit)
    except SandboxUnavailable as exc:
        raise ToolFailure(f"{argv[0]} was not run: {exc}", ErrorKind.SANDBOX_UNAVAILABLE) from None
    finally:
        # In a thread when something was planted: a command may have filled it with a million files.
        planted = await asyncio.to_thread(remove_planted, guarded) if any(map(os.path.lexists, guarded)) else []
    output = outcome.output.rstrip("\n") or "(no output)"
    common: dict[str, Any] = {
        "exit_code": outcome.exit_code,
        "truncated": outcome.omitted > 0,
    }
    if planted:
        names = ", ".join(str(path.relative_to(ctx.root)) for path in planted)
        return ToolResult.error(
            ErrorKind.PERMISSION_DENIED,
            f"{output}\n\n[{names} removed: a command may not create it (git would take its configuration "
            "or hooks from where it points, past the protection of .git/config and .git/hooks)]",
            **common,
        )
    if outcome.limits_hit:
        common["metadata"] = {"limits_hit": [limit.value for limit in outcome.limits_hit]}
        notes = "; ".join(_limit_text(limit, ctx.policy) for limit in outcome.limits_hit)
        ending = f"timed out {stopped_by}, " if outcome.timed_out else ""
        return ToolResult.error(ErrorKind.RESOURCE_LIMIT, f"{output}\n\n[{ending}{notes}]", **common)
    if outcome.timed_out:
        return ToolResult.error(
            ErrorKind.TIMEOUT,
            f"{output}\n\n[timed out {stopped_by}; the command and its child processes were killed]",
            **common,
        )
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return ToolResult.error(ErrorKind.TOOL_ERROR, f"{output}\n\n[killed by signal {-outcome.exit_code}]", **common)
    if outcome.exit_code != 0:
        return ToolResult.error(ErrorKind.TOOL_ERROR, f"{output}\n\n[exit code {outcome.exit_code}]", **common)
    return ToolResult(output=output, **common)


def _limit_text(limit: Limit, policy: SandboxPolicy) -> str:
    limits = policy.limits
    return _LIMIT_TEXT[limit].format(limits=limits, memory=f"{limits.memory_bytes / 2**20:g} MiB")


async def _run(argv: Sequence[str], ctx: ToolContext, limit_seconds: float) -> _Outcome:
    if any("\0" in arg for arg in argv):
        raise ToolFailure(f"{argv[0]!r}: an argument contains a NUL character", ErrorKind.INVALID_ARGUMENTS)
    try:
        command: RunningCommand = await ctx.sandbox.start_command(
            argv, workspace=ctx.workspace, cwd=ctx.workspace, policy=ctx.policy
        )
    except OSError as exc:
        # exc.filename tells a missing program from a missing working directory.
        raise ToolFailure(f"cannot run {argv[0]}: {exc.strerror}: {exc.filename}") from exc
    # The output is a pipe of our own rather than stdout=PIPE: a transport we own can be closed
    # even while a process of the call still holds the write end.
    pipe = os.fdopen(command.output_fd, "rb", buffering=0)
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
            await command.wait()
            # Output written just before the exit may still be in the pipe; background
            # processes holding the pipe open must not keep the call waiting.
            await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
    except TimeoutError:
        # The deadline may also pass while draining the pipe of a command that did finish.
        timed_out = command.returncode is None
    finally:
        command.kill()
        if reader is not None and not reader.done():
            # Every process of the call is dead, so the pipe is at EOF (unless, without a
            # sandbox, one left the process group with setsid).
            await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
            reader.cancel()
            await asyncio.wait({reader})
        if transport is not None:
            transport.close()
        else:
            pipe.close()
        await command.close()
    exit_code = None if timed_out else command.returncode
    return _Outcome(capture.text(), capture.omitted, exit_code, timed_out, command.limits_hit(exit_code))


async def _pump(stream: asyncio.StreamReader, capture: _HeadTail) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await stream.read(_READ_CHUNK):
        capture.feed(decoder.decode(chunk))
    capture.feed(decoder.decode(b"", final=True))
