"""Tools that cannot be wedged: FIFOs, huge lines, symlink loops, long paths, stopped threads."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import copy, delete, edit, files, ls, move, read, write
from tool_worker.tools.base import ErrorKind, ToolContext, ToolFailure
from tool_worker.tools.files import Stopped, run_stoppable


@pytest.fixture
def fifo(workspace: Path) -> Path:
    path = workspace / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("read", {"file_path": "pipe"}),
        ("grep", {"pattern": "x", "path": "pipe"}),
        ("edit", {"file_path": "pipe", "old_string": "a", "new_string": "b"}),
        ("copy", {"source": "pipe", "destination": "pipe2"}),
    ],
)
async def test_a_fifo_is_refused_without_blocking(call: Any, fifo: Path, tool: str, arguments: dict) -> None:
    # Nothing ever writes to the FIFO: a blocking open would never return.
    result = await asyncio.wait_for(call(tool, **arguments), 10)
    assert result.error_kind is ErrorKind.TOOL_ERROR, result.output
    assert "FIFO" in result.output


async def test_search_and_copy_of_a_tree_skip_a_fifo(call: Any, workspace: Path, fifo: Path) -> None:
    (workspace / "notes.txt").write_text("pipe dreams\n")
    found = await asyncio.wait_for(call("search", query="pipe dreams"), 10)
    assert "notes.txt" in found.output
    copied = await asyncio.wait_for(call("copy", source=".", destination="../copy_of_ws"), 10)
    assert copied.error_kind is ErrorKind.PATH_ESCAPE  # the destination is outside; the source is fine
    (workspace / "sub").mkdir()
    os.mkfifo(workspace / "sub" / "inner_pipe")
    (workspace / "sub" / "file.txt").write_text("kept\n")
    copied = await asyncio.wait_for(call("copy", source="sub", destination="sub2"), 10)
    assert not copied.is_error and "1 entries were not copied" in copied.output
    assert (workspace / "sub2" / "file.txt").read_text() == "kept\n"
    assert not (workspace / "sub2" / "inner_pipe").exists()


async def test_a_200_mb_line_is_streamed_and_cut(call: Any, workspace: Path) -> None:
    huge = workspace / "one_line.txt"
    block = b"x" * (1024 * 1024)
    with huge.open("wb") as handle:
        for _ in range(200):
            handle.write(block)
        handle.write(b"\nsecond\n")
    result = await call("read", file_path="one_line.txt")
    lines = result.output.splitlines()
    assert lines[0] == "     1\t" + "x" * read.MAX_LINE_CHARS + f" [... line cut at {read.MAX_LINE_CHARS} characters]"
    assert lines[1] == "     2\tsecond"
    assert result.truncated and result.metadata == {"total_lines": 2}


async def test_a_cut_line_keeps_whole_characters(call: Any, workspace: Path) -> None:
    (workspace / "wide.txt").write_text("é" * (read.READ_CHUNK * 2) + "\n", encoding="utf-8")
    first = (await call("read", file_path="wide.txt")).output.splitlines()[0]
    assert first == "     1\t" + "é" * read.MAX_LINE_CHARS + f" [... line cut at {read.MAX_LINE_CHARS} characters]"


async def test_a_last_line_without_newline_counts(call: Any, workspace: Path) -> None:
    (workspace / "tail.txt").write_bytes(b"a\nb")
    assert (await call("read", file_path="tail.txt")).output == "     1\ta\n     2\tb"


async def test_a_symlink_loop_is_a_plain_error(call: Any, workspace: Path) -> None:
    os.symlink("loop", workspace / "loop")
    calls = [("read", {"file_path": "loop"}), ("ls", {"path": "loop"}), ("grep", {"pattern": "x", "path": "loop"})]
    for tool, arguments in calls:
        result = await call(tool, **arguments)
        assert result.error_kind is ErrorKind.PATH_ESCAPE, (tool, result.output)
        assert "symlink loop" in result.output


@pytest.mark.parametrize("through", ["loop/..", "missing/../loop/.."], ids=["loop", "missing-then-loop"])
async def test_a_loop_before_dotdot_never_hides_the_link_after_it(
    call: Any, workspace: Path, tmp_path: Path, through: str
) -> None:
    # realpath stops resolving at a loop and returned the rest as written: `loop/../out` came
    # back as the symlink `out` itself, which the tool then followed out of the workspace (and
    # past a deny rule naming the link's target, which the policy never saw).
    outside = tmp_path / "outside_secret.txt"
    outside.write_text("TOP-SECRET\n")
    os.symlink("loop", workspace / "loop")
    os.symlink(outside, workspace / "out")
    (workspace / "written.txt").write_text("mine\n")
    for tool, arguments in [("read", {"file_path": f"{through}/out"}), ("ls", {"path": f"{through}/out"}),
                            ("grep", {"pattern": "TOP", "path": f"{through}/out"}),
                            ("copy", {"source": f"{through}/out", "destination": "copied.txt"}),
                            ("write", {"file_path": f"{through}/out", "content": "pwned"})]:
        result = await call(tool, **arguments)
        assert result.error_kind is ErrorKind.PATH_ESCAPE, (tool, result.output)
        assert "TOP-SECRET" not in result.output
    assert outside.read_text() == "TOP-SECRET\n" and not (workspace / "copied.txt").exists()
    # A path that does not exist yet still resolves, for the tools that create it.
    created = await call("write", file_path="missing/../new.txt", content="fine\n")
    assert not created.is_error, created.output
    assert (workspace / "new.txt").read_text() == "fine\n"


async def test_a_1_mb_path_is_a_plain_error(call: Any) -> None:
    for tool, argument in [("read", "file_path"), ("ls", "path"), ("write", "file_path")]:
        arguments = {argument: "a/" * 500_000}
        if tool == "write":
            arguments["content"] = "x"
        result = await call(tool, **arguments)
        assert result.error_kind is ErrorKind.INVALID_ARGUMENTS, (tool, result.output[:200])
        assert "at most 4096" in result.output and len(result.output) < 500


@pytest.mark.parametrize(("tool", "arguments"), [
    ("list_files", {"max_depth": 2**64}),
    ("grep", {"pattern": "x", "output_mode": "content", "-C": 2**64}),
    ("grep", {"pattern": "x", "output_mode": "content", "-A": 2**70}),
    ("grep", {"pattern": "x", "output_mode": "content", "-B": 2**64}),
])
async def test_a_number_too_large_for_ripgrep_is_an_invalid_argument(call: Any, tool: str, arguments: dict) -> None:
    # rg refused it, and the model read "grep failed (rg uses Rust regex syntax): ...".
    result = await call(tool, **arguments)
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS, result.output
    assert "maximum" in result.output, result.output


async def test_a_component_too_long_is_a_plain_error(call: Any) -> None:
    result = await call("read", file_path="n" * 300)
    assert result.error_kind in (ErrorKind.INVALID_ARGUMENTS, ErrorKind.TOOL_ERROR), result.output
    assert "unexpectedly" not in result.output


async def test_a_deep_chain_of_directories_is_copied_whole(call: Any, workspace: Path) -> None:
    # shutil.copytree calls itself per level: 500 levels (a 1 KB path) passed Python's
    # recursion limit, an internal error with half the tree copied.
    leaf = workspace / "chain" / Path(*["d"] * 600)
    leaf.mkdir(parents=True)
    (leaf / "leaf.txt").write_text("deep\n")
    (leaf.parent / "link").symlink_to("d")
    result = await call("copy", source="chain", destination="chain2")
    assert not result.is_error, result.output
    copied = workspace / "chain2" / Path(*["d"] * 600)
    assert (copied / "leaf.txt").read_text() == "deep\n"
    assert os.readlink(copied.parent / "link") == "d"


def test_a_tree_copied_past_unreadable_directories_says_so_in_one_line(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # shutil.Error's text listed every failure, with absolute paths, as the call's whole output:
    # 2.7 MB for 20,000 directories the server could not read. (Root reads every directory, so
    # their listing is made to fail as a mode of 000 makes it for other users.)
    for i in range(300):
        (workspace / "tree" / f"locked{i:03d}").mkdir(parents=True)
    (workspace / "tree" / "open.txt").write_text("copied\n")
    scandir = os.scandir

    def refusing(path: Any) -> Any:
        if os.path.basename(os.fspath(path)).startswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(copy.os, "scandir", refusing)
    ctx = ToolContext(workspace=workspace)
    with pytest.raises(ToolFailure) as failure:
        copy._copy(ctx, workspace / "tree", workspace / "tree2", ("tree", "tree2"), False, threading.Event())
    message = str(failure.value)
    assert message.startswith("cannot copy tree to tree2 whole: 300 entries could not be copied, such as tree/locked")
    assert message.endswith("(Permission denied); the rest was copied") and str(workspace) not in message
    assert (workspace / "tree2" / "open.txt").read_text() == "copied\n"


async def test_grep_says_when_there_is_no_file_to_search(call: Any, workspace: Path) -> None:
    # rg searched nothing and said nothing (--no-messages): the model read "grep failed ... rg gave
    # no reason" for a directory of symlinks.
    (workspace / "links").mkdir()
    os.symlink("/etc/hostname", workspace / "links" / "hostname")
    result = await call("grep", pattern="x", path="links")
    assert not result.is_error, result.output
    assert result.output.startswith("No files in links to search"), result.output


async def test_grep_says_when_its_glob_matches_no_file(call: Any) -> None:
    result = await call("grep", pattern="def", glob="*.nothing")
    assert not result.is_error
    assert result.output == "No files in . match glob '*.nothing', so nothing was searched"


# -- stop flags: a thread left behind by a timeout or a cancel stops, and changes nothing --------


def _stopped() -> threading.Event:
    stop = threading.Event()
    stop.set()
    return stop


def test_a_stopped_edit_writes_nothing(workspace: Path) -> None:
    target = workspace / "src" / "app.py"
    before = target.read_text()
    with pytest.raises(Stopped):
        edit._edit(target, "src/app.py", "load_config", "changed", False, _stopped())
    assert target.read_text() == before


def test_a_stopped_copy_copies_nothing(workspace: Path) -> None:
    ctx = ToolContext(workspace=workspace)
    with pytest.raises(Stopped):
        copy._copy(ctx, workspace / "src", workspace / "src_copy", ("src", "src_copy"), False, _stopped())
    assert not (workspace / "src_copy").exists()


class _StopMidCopy(threading.Event):
    """A stop flag set at its `checks`th look (one per chunk of a file copied), which notes what
    temporary files the directory held at each look."""

    def __init__(self, directory: Path, checks: int) -> None:
        super().__init__()
        self._directory, self.left = directory, checks
        self.seen: list[str] = []

    def is_set(self) -> bool:
        self.seen += _temporaries(self._directory)
        self.left -= 1
        return self.left < 0


def _temporaries(directory: Path) -> list[str]:
    """The temporary files and trees the tools make beside their target (.NAME.XXXXXXXX.tmp)."""
    return [name for name in os.listdir(directory) if name.startswith(".") and name.endswith(".tmp")]


def test_a_copy_of_one_big_file_stops_mid_way(workspace: Path) -> None:
    # One copy2 of a file a command made huge for nothing (`truncate -s 20G f`) went on writing
    # its gigabytes, filling the disk, long after its call had timed out or been cancelled.
    big = workspace / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(256 * 1024 * 1024)
    ctx = ToolContext(workspace=workspace)
    stop = _StopMidCopy(workspace, checks=20)  # 20 of its 256 chunks
    with pytest.raises(Stopped):
        copy._copy(ctx, big, workspace / "copy.bin", ("big.bin", "copy.bin"), False, stop)
    assert stop.left < 0  # stopped at a chunk, not after the copy
    assert not (workspace / "copy.bin").exists()
    assert not _temporaries(workspace)
    # Unnamed while it is written: a server killed meanwhile left a partial .copy.bin.XXXXXXXX.tmp.
    assert stop.seen == []


def test_stopped_read_and_ls_end(workspace: Path) -> None:
    with pytest.raises(Stopped):
        read._stream((workspace / "src" / "app.py").open("rb"), "src/app.py", 1, 10, _stopped())
    with pytest.raises(Stopped):
        ls._list(ToolContext(workspace=workspace), workspace / "src", "src", [], _stopped())


async def test_run_stoppable_sets_the_flag_when_its_call_is_cancelled() -> None:
    entered = threading.Event()
    seen_stop = threading.Event()

    def work(stop: threading.Event) -> None:
        entered.set()
        if stop.wait(30):
            seen_stop.set()

    task = asyncio.create_task(run_stoppable(work))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(seen_stop.wait, 10)


async def test_a_cancelled_call_ends_only_once_its_thread_has_stopped() -> None:
    # The Execute lane runs its next call when this one ends: a delete or a write still at work in
    # its thread would run beside it (a `bash` reinstalling the tree being deleted, say).
    entered, saw_stop, may_finish = threading.Event(), threading.Event(), threading.Event()

    def work(stop: threading.Event) -> None:
        entered.set()
        stop.wait(30)
        saw_stop.set()
        may_finish.wait(30)  # the last change it makes before it looks at stop again
        raise Stopped

    task = asyncio.create_task(run_stoppable(work))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    assert await asyncio.to_thread(saw_stop.wait, 10)
    ended, _ = await asyncio.wait({task}, timeout=0.2)
    assert not ended, "the call ended while its thread was still at work"
    may_finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_thread_that_never_stops_does_not_hang_its_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "STOP_GRACE_SECONDS", 0.05)
    entered, release = threading.Event(), threading.Event()

    def stuck(stop: threading.Event) -> None:
        entered.set()
        release.wait(30)  # a system call that never returns, and never looks at stop

    task = asyncio.create_task(run_stoppable(stuck))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    finally:
        release.set()


class _StopAfter(threading.Event):
    """A stop flag that is set once it has been looked at `checks` times."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def _tree(root: Path, files_per_directory: int = 50) -> int:
    for directory in ("a", "a/b", "a/b/c", "d"):
        (root / directory).mkdir(parents=True)
        for index in range(files_per_directory):
            (root / directory / f"f{index}").write_text("x")
    return 4 * files_per_directory + 4


def _entries(root: Path) -> int:
    return sum(len(directories) + len(names) for _, directories, names in os.walk(root))


def test_a_stopped_recursive_delete_leaves_the_rest(workspace: Path) -> None:
    # shutil.rmtree of a tree of a million files went on deleting long after its call had ended.
    total = _tree(workspace / "big")
    with pytest.raises(Stopped):
        delete._delete(workspace / "big", "big", True, _StopAfter(20))
    assert _entries(workspace / "big") == total - 20  # 20 files went, and nothing after them


def test_a_recursive_delete_that_fails_part_way_says_what_it_deleted(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An entry that cannot go (immutable, a mount, a read-only directory) ended it with "cannot
    # delete big: Operation not permitted", read as if nothing had gone, after 9 files had.
    total = _tree(workspace / "big")
    real, calls = os.unlink, [0]

    def refusing(path: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 10:
            raise PermissionError(1, os.strerror(1), path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    with pytest.raises(ToolFailure) as raised:
        delete._delete(workspace / "big", "big", True, threading.Event())
    monkeypatch.undo()
    assert str(raised.value) == ("cannot delete big whole: Operation not permitted; 9 entries inside it were "
                                 "deleted before that, the rest is still there")
    assert _entries(workspace / "big") == total - 9


async def test_a_deep_chain_of_directories_is_deleted(call: Any, workspace: Path) -> None:
    # os.fwalk recurses once per level: 1,200 levels (a 2.4 KB path, which a command makes in
    # one go) failed with an internal RecursionError, the tree left in place.
    leaf = workspace / "chain"
    leaf.mkdir()
    for _ in range(1200):
        leaf = leaf / "d"
        leaf.mkdir()
    (leaf / "leaf.txt").write_text("deep\n")
    result = await call("delete", path="chain", recursive=True)
    assert not result.is_error, result.output
    assert not (workspace / "chain").exists()


def test_a_recursive_delete_removes_links_not_what_they_point_to(workspace: Path, tmp_path: Path) -> None:
    _tree(workspace / "big", files_per_directory=3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (workspace / "big" / "a" / "to_outside").symlink_to(outside)
    (workspace / "big" / "d" / "to_file").symlink_to(outside / "keep.txt")
    (workspace / "big" / "d" / "dangling").symlink_to(tmp_path / "nowhere")
    result = delete._delete(workspace / "big", "big", True, threading.Event())
    assert result.output == "Deleted directory big and its contents"
    assert not os.path.lexists(workspace / "big")
    assert (outside / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("checks", [0, 1, 10])
def test_a_stopped_overwrite_by_move_keeps_the_destination(workspace: Path, checks: int) -> None:
    # The old destination was deleted first, a stop flag checked before each entry: a move stopped
    # then left it half deleted, and the source where it was. Now the move is whole or not at all.
    total = _tree(workspace / "target")
    source = _entries(workspace / "src")
    try:
        move._move(ToolContext(workspace=workspace), workspace / "src", workspace / "target", ("src", "target"),
                   True, _StopAfter(checks))
    except Stopped:
        assert (workspace / "src").is_dir() and _entries(workspace / "target") == total
    else:
        assert not (workspace / "src").exists() and _entries(workspace / "target") == source
        assert (workspace / "target" / "app.py").is_file()
    assert not _temporaries(workspace)


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("failure", ["stopped", "disk full"])
def test_a_copy_over_a_destination_that_fails_part_way_keeps_the_old_one(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, kind: str, failure: str
) -> None:
    # copy with overwrite=true deleted the old destination before copying: a copy that failed
    # part way (a full disk) or was stopped left the old one gone and the new one partial.
    source, target = workspace / "source", workspace / "target"
    if kind == "file":
        source.write_bytes(b"new" * 100_000)
        target.write_text("old\n")
        monkeypatch.setattr(copy, "_CHUNK_BYTES", 4096)
    else:
        _tree(source, files_per_directory=10)
        _tree(target, files_per_directory=3)
    before = sorted(os.walk(target))
    stop: threading.Event = _StopAfter(5) if failure == "stopped" else threading.Event()
    if failure == "disk full":
        real = os.fdopen
        written = []

        def filling(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real(fd, mode, *args, **kwargs)
            if "w" in mode:
                written.append(fd)
                if len(written) > 3 or kind == "file":
                    handle.raw.write = _no_space  # the disk is full from the fourth file on
            return handle

        monkeypatch.setattr(copy.os, "fdopen", filling)
    with pytest.raises((Stopped, ToolFailure, OSError)) as raised:
        copy._copy(ToolContext(workspace=workspace), source, target, ("source", "target"), True, stop)
    monkeypatch.undo()
    if kind == "file":
        assert target.read_text() == "old\n"
    else:
        assert sorted(os.walk(target)) == before
    if isinstance(raised.value, ToolFailure):
        assert "target was left as it was" in str(raised.value)
    assert not _temporaries(workspace)


@pytest.mark.parametrize("overwrite", [False, True])
async def test_a_cancelled_copy_leaves_the_workspace_as_it_was(
    call: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    # Through the registry, as the Execute lane runs it: cancelled while it copies a file.
    _tree(workspace / "target", files_per_directory=2)
    before = sorted(os.walk(workspace))
    entered = threading.Event()
    real = copy._copy_file

    def waiting(source: str, destination: str, stop: threading.Event, shown: str) -> None:
        entered.set()
        stop.wait(30)
        real(source, destination, stop, shown)

    monkeypatch.setattr(copy, "_copy_file", waiting)
    destination = "target" if overwrite else "new"
    task = asyncio.create_task(call("copy", source="src", destination=destination, overwrite=overwrite))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(os.walk(workspace)) == before


@pytest.mark.parametrize("tool", ["write", "copy", "move"])
async def test_a_change_that_fails_removes_the_directories_it_made(
    call: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    # A write to new/deep/file.txt on a full disk failed, and left new/deep behind, empty.
    before = sorted(os.walk(workspace))

    def no_space(*args: Any) -> None:
        raise OSError(28, os.strerror(28))

    if tool == "write":
        monkeypatch.setattr(write, "atomic_write", no_space)
        result = await call("write", file_path="new/deep/file.txt", content="x")
    elif tool == "copy":
        def no_space_for_content(source: Any, descriptor: int, stop: Any) -> None:
            os.close(descriptor)  # as the copy's own would, on its way out
            no_space()

        monkeypatch.setattr(copy, "_copy_content", no_space_for_content)
        result = await call("copy", source="README.md", destination="new/deep/README.md")
    else:
        monkeypatch.setattr(move, "put_in_place", no_space)
        result = await call("move", source="README.md", destination="new/deep/README.md")
    assert result.is_error and "No space left on device" in result.output, result.output
    assert sorted(os.walk(workspace)) == before


def _no_space(data: Any) -> int:
    raise OSError(28, os.strerror(28))


def test_a_copy_to_a_new_path_that_fails_part_way_says_what_it_copied(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no destination to keep, what could be copied is put in place, and the result says so.
    _tree(workspace / "source", files_per_directory=2)
    real = copy._copy_file

    def failing(source: str, destination: str, stop: threading.Event, shown: str) -> None:
        if source.endswith("a/f1"):
            raise OSError(28, os.strerror(28))
        real(source, destination, stop, shown)

    monkeypatch.setattr(copy, "_copy_file", failing)
    with pytest.raises(ToolFailure, match=r"1 entries could not be copied.*the rest was copied"):
        copy._copy(ToolContext(workspace=workspace), workspace / "source", workspace / "target",
                   ("source", "target"), False, threading.Event())
    assert _entries(workspace / "target") == _entries(workspace / "source") - 1
    assert not _temporaries(workspace)


@pytest.mark.parametrize("tool", ["copy", "move"])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_destination_that_appears_meanwhile_is_left_alone(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, tool: str, kind: str
) -> None:
    # A command beside the call (a background job) makes the destination after it was checked:
    # copy wrote over that file, and move wrote over it or moved the source inside it.
    target = workspace / "target"
    real = files.make_parents

    def appearing(path: Path, shown: str) -> None:
        real(path, shown)
        if kind == "file":
            target.write_text("theirs\n")
        else:
            target.mkdir()
            (target / "theirs.txt").write_text("theirs\n")

    monkeypatch.setattr(files, "make_parents", appearing)
    run = copy._copy if tool == "copy" else move._move
    with pytest.raises(ToolFailure, match="already exists"):
        run(ToolContext(workspace=workspace), workspace / "src", target, ("src", "target"), False, threading.Event())
    if kind == "file":
        assert target.read_text() == "theirs\n"
    else:
        assert os.listdir(target) == ["theirs.txt"]
    assert (workspace / "src" / "app.py").is_file()
    assert not _temporaries(workspace)


def test_a_stopped_write_leaves_the_file_as_it_was(workspace: Path) -> None:
    target = workspace / "README.md"
    before = target.read_bytes()
    with pytest.raises(Stopped):
        write._write(target, "README.md", "new content", _stopped())
    assert target.read_bytes() == before
    assert not [name for name in os.listdir(workspace) if name.endswith(".tmp")]


async def test_a_search_query_longer_than_the_maximum_is_refused_before_it_runs(call: Any) -> None:
    # 100,000 distinct words cost about 77 s a file, in a thread that went on after its call ended.
    result = await call("search", query=" ".join(f"w{i}" for i in range(100_000)))
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS, result.output[:200]
    assert "is too long" in result.output, result.output[:200]


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "no-O_TMPFILE"])
async def test_a_file_copy_has_the_content_and_mode_of_its_source(
    call: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # A file system without unnamed files (O_TMPFILE) gets a named temporary file instead.
    source = workspace / "tool.sh"
    source.write_bytes(b"#!/bin/sh\necho hi\n" * 100_000)
    source.chmod(0o750)
    if not unnamed:
        real_open = os.open

        def no_unnamed_files(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_unnamed_files)
    result = await call("copy", source="tool.sh", destination="bin/tool.sh")
    assert not result.is_error, result.output
    copied = workspace / "bin" / "tool.sh"
    assert copied.read_bytes() == source.read_bytes()
    assert copied.stat().st_mode & 0o7777 == 0o750
    assert copied.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert not _temporaries(workspace / "bin")
