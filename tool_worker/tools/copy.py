"""copy: copy a file or a directory tree (Execute lane)."""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tool_worker import effects
from tool_worker.confinement.protected import refuse_protected
from tool_worker.denied import relative_to_root
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import (
    check_destination,
    check_stop,
    describe_file_type,
    discard,
    new_parents,
    open_regular,
    put_in_place,
    run_stoppable,
    source_destination_schema,
    temp_prefix,
)

# Files are copied a chunk at a time, so that a call stopped mid-way stops copying: one copy2 of
# a file a command made huge for nothing (`truncate -s 20G f`, no disk used) went on writing its
# gigabytes, filling the disk, long after its call had timed out or been cancelled.
_CHUNK_BYTES = 1024 * 1024


def _copy_file(source: str | Path, destination: str | Path, stop: threading.Event, shown: str) -> None:
    """copy2 (content, then mode and times), checking `stop` before each chunk; a copy stopped
    mid-way is removed. Neither end is opened so that it could block: a command running beside
    the call may have put a FIFO in the place of either since it was looked at (shown as `shown`),
    and an open() waiting for a FIFO's other end is out of reach of `stop`."""
    with open_regular(source, shown) as src:
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        try:
            _copy_content(src, descriptor, stop)
        except BaseException:
            os.unlink(destination)
            raise
    shutil.copystat(source, destination)


def _copy_content(src: BinaryIO, descriptor: int, stop: threading.Event) -> None:
    """Copies what is left of `src` into `descriptor`, a chunk at a time, and closes it."""
    # The close too: the last chunk's bytes are written then, and a full disk refuses them.
    with os.fdopen(descriptor, "wb") as dst:
        while True:
            check_stop(stop)
            chunk = src.read(_CHUNK_BYTES)
            if not chunk:
                break
            dst.write(chunk)


def _copy_file_unnamed(source: Path, destination: Path, stop: threading.Event, shown: str) -> Path:
    """A copy of `source` beside `destination` (as `_copy_file` makes one) that has no name until
    it is whole (O_TMPFILE), then a hidden one, returned: a server killed during a big copy left a
    partial `.NAME.XXXXXXXX.tmp` in the workspace. A file system without unnamed files gets a
    named temporary file from the start."""
    try:
        descriptor = os.open(destination.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        descriptor = None
    if descriptor is None or not os.path.isdir("/proc/self/fd"):  # nothing could name it: named now
        if descriptor is not None:
            os.close(descriptor)
        handle, name = tempfile.mkstemp(dir=destination.parent, prefix=temp_prefix(destination), suffix=".tmp")
        os.close(handle)
        try:
            _copy_file(source, name, stop, shown)
        except BaseException:
            discard(name)
            raise
        return Path(name)
    with open_regular(source, shown) as src:
        # Named through /proc while it is still open: the descriptor _copy_content closes is a duplicate.
        named = os.dup(descriptor)
        try:
            _copy_content(src, descriptor, stop)
            temp = _link_hidden(named, destination)
        finally:
            os.close(named)
    try:
        shutil.copystat(source, temp)
    except BaseException:
        discard(temp)
        raise
    return temp


def _link_hidden(descriptor: int, beside: Path) -> Path:
    """Gives the unnamed file open at `descriptor` a new hidden name beside `beside`."""
    directory = os.open(beside.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            name = f"{temp_prefix(beside)}{secrets.token_hex(4)}.tmp"
            try:
                # linkat(AT_SYMLINK_FOLLOW) of the /proc link, as open(2) says for O_TMPFILE (a
                # directory descriptor makes Python call linkat rather than link, which would
                # link the /proc symlink itself).
                os.link(f"/proc/self/fd/{descriptor}", name, dst_dir_fd=directory, follow_symlinks=True)
                return beside.parent / name
            except FileExistsError:
                continue
    finally:
        os.close(directory)


def _copy_tree(
    source: Path,
    destination: Path,
    ignore: Callable[[str, list[str]], set[str]],
    copy_file: Callable[[str, str], object],
) -> list[tuple[str, OSError]]:
    """shutil.copytree(symlinks=True) without its recursion: copytree calls itself once per
    level, so a chain of about 500 directories (a 1 KB path) passed Python's
    recursion limit, and the call failed with an internal error, half the tree copied. The same
    rules: `ignore` sees each directory's names before it is made, links are copied as links,
    a directory's mode and times are set once its content is in, and what fails below the top is
    left out and returned, (source path, error) each, the rest copied."""
    errors: list[tuple[str, OSError]] = []
    made: list[tuple[str, str]] = []
    top = os.fspath(destination)  # made by the caller (the hidden name the copy is made under)
    pending = [(os.fspath(source), top)]
    while pending:
        from_dir, to_dir = pending.pop()
        try:
            with os.scandir(from_dir) as listing:
                entries = list(listing)
        except OSError as exc:
            if not made:
                raise
            errors.append((from_dir, exc))
            continue
        left_out = ignore(from_dir, [entry.name for entry in entries])
        os.makedirs(to_dir, exist_ok=to_dir == top)
        made.append((from_dir, to_dir))
        for entry in entries:
            if entry.name in left_out:
                continue
            target = os.path.join(to_dir, entry.name)
            try:
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), target)
                    shutil.copystat(entry.path, target, follow_symlinks=False)
                elif entry.is_dir():
                    pending.append((entry.path, target))
                else:
                    copy_file(entry.path, target)
            except OSError as exc:
                errors.append((entry.path, exc))
    for from_dir, to_dir in reversed(made):
        try:
            shutil.copystat(from_dir, to_dir)
        except OSError as exc:
            errors.append((from_dir, exc))
    return errors


def _copy(
    ctx: ToolContext, source: Path, destination: Path, shown: tuple[str, str], overwrite: bool, stop: threading.Event
) -> ToolResult:
    if not source.exists():
        raise ToolFailure(f"source not found: {shown[0]}")
    mode = source.stat().st_mode
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        # Copying a FIFO would wait for a writer for ever.
        raise ToolFailure(f"{shown[0]} is {describe_file_type(mode)}: copy only copies files and directories")
    check_destination(source, destination, shown[1], overwrite)
    check_stop(stop)
    with new_parents(destination, shown[1]):
        result = _copy_into_place(ctx, source, destination, shown, overwrite, stat.S_ISDIR(mode), stop)
    if isinstance(result, ToolFailure):
        raise result
    return result


def _copy_into_place(
    ctx: ToolContext, source: Path, destination: Path, shown: tuple[str, str], overwrite: bool, is_dir: bool,
    stop: threading.Event,
) -> ToolResult | ToolFailure:
    replacing = os.path.lexists(destination)
    # The copy is made under a hidden name beside the destination and renamed into place once
    # whole. The old destination was removed first: a copy that failed part way (a full disk) or
    # was stopped left it gone and the new one partial, and one that appeared meanwhile was
    # written over.
    if is_dir:
        temp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=temp_prefix(destination), suffix=".tmp"))
        try:
            result = _copy_tree_to(ctx, source, temp, shown, replacing, stop)
        except BaseException:
            discard(temp)
            raise
    else:
        temp = _copy_file_unnamed(source, destination, stop, shown[0])
        result = ToolResult(output=f"Copied {shown[0]} to {shown[1]}")
    try:
        check_stop(stop)  # the last moment a stopped call can still leave the destination as it was
    except BaseException:
        discard(temp)
        raise
    try:
        put_in_place(temp, destination, overwrite, shown[1])
    except OSError as exc:
        discard(temp)
        if isinstance(exc, FileExistsError) and not overwrite:
            raise ToolFailure(f"destination {shown[1]} already exists (it appeared during the copy); "
                              "set overwrite=true to replace it") from None
        raise
    return result


def _copy_tree_to(
    ctx: ToolContext, source: Path, temp: Path, shown: tuple[str, str], replacing: bool, stop: threading.Event
) -> ToolResult | ToolFailure:
    """Copies the directory `source` into `temp` (made already); the result to give once it is in
    place (a failure to raise, when part of the tree could not be copied)."""
    left_out = 0

    def ignore(directory: str, names: list[str]) -> set[str]:
        # Entries the policy denies reading, and anything but files, directories and links.
        nonlocal left_out
        check_stop(stop)
        base = relative_to_root(ctx.root, directory) or "."
        skipped = set()
        for name in names:
            entry = os.lstat(os.path.join(directory, name)).st_mode
            special = not (stat.S_ISDIR(entry) or stat.S_ISREG(entry) or stat.S_ISLNK(entry))
            if special or ctx.hides(posixpath.join(base, name)):
                skipped.add(name)
        left_out += len(skipped)
        return skipped

    def copy_file(src: str, dst: str) -> str:
        _copy_file(src, dst, stop, relative_to_root(ctx.root, src) or src)
        return dst

    # Links inside the tree are copied as links: following them could read outside the workspace.
    errors = _copy_tree(source, temp, ignore, copy_file)
    if errors:
        # One example and a count: shutil.Error's text listed every failure with its absolute
        # paths, 2.7 MB for 20,000 unreadable directories, all of it the call's output.
        path, exc = errors[0]
        failed = (f"cannot copy {shown[0]} to {shown[1]} whole: {len(errors)} entries could not be copied, "
                  f"such as {relative_to_root(ctx.root, path) or path} ({exc.strerror or exc})")
        if replacing:
            # A partial copy does not replace a whole directory: the user keeps the old one.
            raise ToolFailure(f"{failed}; {shown[1]} was left as it was")
        return ToolFailure(f"{failed}; the rest was copied")
    notice = (
        f"\n[{left_out} entries were not copied: special files (FIFOs, sockets, devices) and paths this "
        "session's permission policy denies reading]" if left_out else ""
    )
    return ToolResult(output=f"Copied directory {shown[0]} to {shown[1]}{notice}", truncated=bool(left_out))


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    # The source is read, so it resolves through symlinks (and must land inside); the
    # destination names the new entry itself.
    source = resolve_in_workspace(ctx.workspace, args["source"])
    destination = resolve_in_workspace(ctx.workspace, args["destination"], follow_final_symlink=False)
    ctx.check_readable(source, args["source"])
    refuse_protected(ctx, "copy", (destination, args["destination"]))
    shown = (args["source"], args["destination"])
    try:
        return await run_stoppable(_copy, ctx, source, destination, shown, args.get("overwrite", False))
    except OSError as exc:
        raise ToolFailure(f"cannot copy {shown[0]} to {shown[1]}: {exc.strerror or exc}") from exc


TOOL = Tool(
    spec=ToolSpec(
        name="copy",
        description=(
            "Copy a file, or a directory with everything inside it. destination is the path of the "
            "copy itself (not a directory to copy into); missing parent directories are created. "
            "An existing destination is an error unless overwrite=true, which replaces it. "
            "Symlinks inside a copied directory stay symlinks. Paths are relative to the workspace root."
        ),
        parameters=source_destination_schema("File or directory to copy.", "Path of the copy."),
        lane=Lane.EXECUTE,
        idempotent=False,
    ),
    run=_run,
    effects=effects.writes("destination", reading=("source",)),
)
