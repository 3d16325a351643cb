"""Small file helpers shared by the tools: opening only regular files, stoppable threads, writes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tool_worker.tools.base import ErrorKind, ToolFailure

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, for ever, holding a
# thread of the pool that every tool shares. It changes nothing for a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


# How long a call that ended early waits for its thread to notice (run_stoppable): the threads
# check between chunks and entries, milliseconds apart.
STOP_GRACE_SECONDS = 5.0


class Stopped(Exception):
    """Raised inside a tool's thread when its call was cancelled or timed out."""


async def run_stoppable(function: Callable[..., _T], *args: Any) -> _T:
    """Runs `function(*args, stop)` in a thread; `stop` is set when the call ends for any reason.

    A thread cannot be killed: a cancelled or timed-out call would otherwise go on reading (or
    worse, writing) after its result was given. The function checks `stop` in its loops and
    before any change it makes, and raises `Stopped` (or returns) when it is set. A call that
    ends early returns only once its thread has stopped: the Execute lane runs its next call
    then, and a `delete` still removing files, or a `write` about to land, must not run beside
    it. A thread that does not stop within STOP_GRACE_SECONDS (a system call that hangs, on a
    network filesystem say) is left behind, logged, so that the call itself cannot hang.
    """
    stop = threading.Event()
    running = asyncio.ensure_future(asyncio.to_thread(function, *args, stop))
    try:
        return await asyncio.shield(running)
    finally:
        stop.set()
        if not running.done():
            await asyncio.wait({running}, timeout=STOP_GRACE_SECONDS)
            if not running.done():
                log.warning("a stopped tool's thread (%s) is still running after %gs; the call ended without it",
                            getattr(function, "__qualname__", function), STOP_GRACE_SECONDS)
        # Its own end (Stopped, most often) is not news: the call ended for another reason.
        running.add_done_callback(_retrieved)


def _retrieved(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


def check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise Stopped


def hidden_notice(count: int) -> str:
    """What a listing says about the entries the session's policy left out (not which ones)."""
    noun = "entry" if count == 1 else "entries"
    return f"[{count} {noun} left out: this session's permission policy denies reading them]"


def describe_file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def open_regular(path: Path | str, shown: str) -> BinaryIO:
    """Opens a regular file for reading, without ever blocking on a FIFO or a device.

    Raises ToolFailure for anything else (FIFO, socket, device, directory), naming what it is,
    and for a missing or unreadable file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise ToolFailure(f"file not found: {shown}") from exc
    except IsADirectoryError as exc:
        raise ToolFailure(f"{shown} is a directory; use ls or list_files to see what is in it") from exc
    except PermissionError as exc:
        raise ToolFailure(f"permission denied reading {shown}") from exc
    except OSError as exc:
        raise ToolFailure(f"cannot open {shown}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ToolFailure(f"{shown} is a directory; use ls or list_files to see what is in it")
        if not stat.S_ISREG(mode):
            raise ToolFailure(f"{shown} is {describe_file_type(mode)}: tools only read regular files")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_current_umask()


def encode_text(text: str, field: str) -> bytes:
    """`text` as UTF-8. A lone surrogate (JSON's "\\ud800" decodes to one) is the model's mistake
    and is said to be: INVALID_ARGUMENTS naming the field and the code point, never the text."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolFailure(
            f"{field} holds a lone surrogate (U+{ord(exc.object[exc.start]):04X}), which UTF-8 cannot encode; "
            "send the text without it",
            ErrorKind.INVALID_ARGUMENTS,
        ) from None


def make_parents(path: Path, shown: str) -> None:
    """Creates the missing directories above `path` (the argument `shown` named). A file where one
    of them should be is named, where mkdir says only "File exists" or "Not a directory"."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # The missing components are the last ones of both `path` and `shown`, resolved or not:
        # the deepest existing ancestor is as many components up in either.
        up = next((count for count, parent in enumerate(path.parents) if os.path.lexists(parent)), None)
        named = Path(os.path.normpath(shown)).parents
        in_the_way = named[up] if up is not None and up < len(named) else None
        what = f"{in_the_way} is a file, not a directory" if in_the_way else "a file is in the way"
        raise ToolFailure(f"cannot create the directories {shown} needs: {what}") from None


@contextlib.contextmanager
def new_parents(path: Path, shown: str) -> Iterator[None]:
    """make_parents for a change made in the block: if it fails (a full disk) or is stopped, the
    directories made for it are removed again, instead of staying, empty, in the workspace."""
    missing = list(itertools.takewhile(lambda parent: not os.path.lexists(parent), path.parents))
    make_parents(path, shown)
    try:
        yield
    except BaseException:
        for directory in missing:  # the deepest first
            try:
                os.rmdir(directory)
            except OSError:
                break  # something else put an entry there meanwhile: it stays
        raise


_TEMP_NAME_BYTES = 200


def temp_prefix(path: Path) -> str:
    """The start of the hidden name of a temporary file or directory made beside `path`: its name
    after a dot, so that listings (glob, list_files: hidden files are skipped) never show one a
    killed process left. It holds at most the first 200 bytes of the name: a name near the
    255-byte limit, and 14 bytes more, made every write and edit of that file fail with "File
    name too long". Cut bytes decode back to themselves (surrogateescape)."""
    return "." + os.fsencode(path.name)[:_TEMP_NAME_BYTES].decode("utf-8", "surrogateescape") + "."


def atomic_write(path: Path, data: bytes, stop: threading.Event | None = None) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a partial one.

    The temporary file lives in the same directory (os.replace is atomic only within a file
    system) and gets the mode of the file it replaces, or the umask default for a new one.
    """
    if path.is_dir():
        raise ToolFailure(f"{path.name} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, mode)
        if stop is not None:
            check_stop(stop)  # the last moment a stopped call can still leave the file as it was
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2_call: Any = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc 2.28+, or not Linux
    _renameat2_call = None
# What a file system (or a kernel) without renameat2's flags answers: rename another way.
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def _renameat2(old: Path, new: Path, flags: int) -> None:
    if _renameat2_call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _renameat2_call(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(old), None, os.fspath(new))


def discard(path: Path | str) -> None:
    """Removes a temporary file or tree the call made (or an old destination it swapped out),
    whatever the call's stop says: left half-removed, it would stay in the workspace."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            remove_tree(Path(path), threading.Event())
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def put_in_place(new: Path, destination: Path, overwrite: bool, shown: str) -> None:
    """Renames `new` (a file, a link or a tree) to `destination` (shown as `shown`) in one step.

    Without `overwrite`, a destination that appeared since it was checked is kept and
    FileExistsError raised: a rename would replace a file, or put a directory inside one. With
    it, the old destination is swapped out in the same step (renameat2's RENAME_EXCHANGE), so
    that at every moment the destination is the old entry or the new one, never missing, and
    only then removed. A file system without the flags gets a plain rename (atomic for a file
    over a file), else the old destination is moved aside first.
    """
    if not overwrite:
        try:
            _renameat2(new, destination, _RENAME_NOREPLACE)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        if os.path.lexists(destination):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(destination))
        os.rename(new, destination)
        return
    new_is_dir = new.is_dir() and not new.is_symlink()
    old_is_dir = destination.is_dir() and not destination.is_symlink()
    if not os.path.lexists(destination) or not (new_is_dir or old_is_dir):
        os.replace(new, destination)
        return
    try:
        _renameat2(new, destination, _RENAME_EXCHANGE)
        old = new
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        aside = Path(tempfile.mkdtemp(dir=destination.parent, prefix=temp_prefix(destination), suffix=".tmp"))
        os.rename(destination, aside / "old")
        try:
            os.rename(new, destination)
        except BaseException:
            os.rename(aside / "old", destination)
            os.rmdir(aside)
            raise
        old = aside
    try:
        discard(old)
    except OSError as exc:
        raise ToolFailure(
            f"{shown} was replaced, but what it held before could not all be removed ({exc.strerror or exc}): "
            f"the rest is in {relative_name(old, destination, shown)}"
        ) from exc


def relative_name(path: Path, beside: Path, shown: str) -> str:
    """`path`, a name in the directory of `beside`, as the caller would name it (`shown` names `beside`)."""
    return os.path.join(os.path.dirname(shown), path.name) if path.parent == beside.parent else os.fspath(path)


def is_binary(head: bytes) -> bool:
    """The heuristic of git and grep: a NUL byte in the first block means binary."""
    return b"\0" in head


def remove_existing(path: Path, stop: threading.Event) -> None:
    """Clear the way for an overwrite: a directory goes with its contents."""
    check_stop(stop)
    if path.is_dir() and not path.is_symlink():
        remove_tree(path, stop)
    else:
        path.unlink()


def remove_tree(path: Path, stop: threading.Event, removed: list[int] | None = None) -> None:
    """shutil.rmtree, checking `stop` before each entry it removes: a stopped removal leaves the
    rest in place instead of deleting on, a tree of a million files, after its call has ended.
    `removed[0]`, if given, counts the entries removed: what one that failed part way did.

    As rmtree's own, it never follows a symlink: directories are opened relative to their
    parent's descriptor and with O_NOFOLLOW, so one that is no longer the directory that was
    listed (a command swapped a symlink in) is not entered; a symlink is removed, not what it
    points to. The first error ends it, as rmtree's does. The walk keeps its own stack (one
    descriptor per level, as os.fwalk's): os.fwalk recurses once per level, and a chain of about
    a thousand directories failed the call with an internal RecursionError.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    count = removed if removed is not None else [0]
    # (descriptor, entries still to remove: (name, is a directory), its name in its parent)
    stack: list[tuple[int, list[tuple[str, bool]], str]] = []
    try:
        top = os.open(path, flags)
        stack.append((top, _entries(top), ""))
        while stack:
            directory_fd, entries, name = stack[-1]
            if not entries:
                stack.pop()
                os.close(directory_fd)
                if stack:
                    check_stop(stop)
                    os.rmdir(name, dir_fd=stack[-1][0])
                    count[0] += 1
                continue
            entry, is_dir = entries.pop()
            if not is_dir:
                check_stop(stop)
                os.unlink(entry, dir_fd=directory_fd)
                count[0] += 1
                continue
            try:
                child = os.open(entry, flags, dir_fd=directory_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                check_stop(stop)
                os.unlink(entry, dir_fd=directory_fd)  # a symlink or file swapped in: removed, not followed
                count[0] += 1
                continue
            stack.append((child, _entries(child), entry))
    finally:
        for directory_fd, _, _ in stack:
            os.close(directory_fd)
    check_stop(stop)
    os.rmdir(path)


def _entries(directory_fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory, not a link to one) of each entry of the directory open at `directory_fd`."""
    with os.scandir(directory_fd) as listing:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing]


def check_destination(source: Path, destination: Path, shown: str, overwrite: bool) -> None:
    """Refuse a move or copy that would lose data or never finish."""
    if destination == source:
        raise ToolFailure("source and destination are the same path")
    if source.is_dir() and not source.is_symlink() and destination.is_relative_to(source):
        raise ToolFailure(f"cannot put directory {source.name} inside itself ({shown})")
    if source.is_relative_to(destination):
        raise ToolFailure(f"destination {shown} contains the source; replacing it would destroy the source")
    if (destination.exists() or destination.is_symlink()) and not overwrite:
        raise ToolFailure(f"destination {shown} already exists; set overwrite=true to replace it")


def source_destination_schema(source_help: str, destination_help: str) -> dict[str, Any]:
    """Arguments of the tools that take a path to a new path (copy, move)."""
    return {
        "type": "object",
        "properties": {
            "source": {"type": "string", "minLength": 1, "description": source_help},
            "destination": {"type": "string", "minLength": 1, "description": destination_help},
            "overwrite": {"type": "boolean", "description": "Replace an existing destination (default false)."},
        },
        "required": ["source", "destination"],
        "additionalProperties": False,
    }
