from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.polling import poll_until
from tool_worker.confinement.readonly import ReadOnlyLauncher
from tool_worker.tools import grep
from tool_worker.tools.base import ErrorKind
from tool_worker.tools.rg import ANSWER_ON_LOOP_BYTES, RgOutput, answer_of, run_rg


async def test_files_with_matches_sorted_and_gitignored(call: Any) -> None:
    result = await call("grep", pattern="load_config")
    # build/out.py and debug.log are ignored by .gitignore.
    assert result.output.splitlines() == ["src/app.py", "src/pkg/util.py"]


async def test_content_mode(call: Any) -> None:
    result = await call("grep", pattern="load_?config", output_mode="content", **{"-i": True})
    assert result.output.splitlines() == [
        "src/app.py:1:def load_config(path):",
        "src/pkg/util.py:2:    return load_config('x')",
        "src/pkg/web.js:1:export function loadConfig() { return 1; }",
    ]
    plain = await call("grep", pattern="TODO", output_mode="content", **{"-n": False})
    assert plain.output == "src/app.py:# TODO: cache it"


async def test_context_lines(call: Any) -> None:
    result = await call("grep", pattern="TODO", output_mode="content", **{"-B": 2})
    assert result.output.splitlines() == [
        "src/app.py-2-    return path",
        "src/app.py-3-",
        "src/app.py:4:# TODO: cache it",
    ]


async def test_count_glob_type_and_single_file(call: Any) -> None:
    counted = await call("grep", pattern="return", output_mode="count")
    assert counted.output.splitlines() == ["src/app.py:1", "src/pkg/util.py:1", "src/pkg/web.js:1"]
    only_js = await call("grep", pattern="return", glob="*.js")
    assert only_js.output == "src/pkg/web.js"
    only_py = await call("grep", pattern="return", type="py", path="src/pkg")
    assert only_py.output == "src/pkg/util.py"
    one_file = await call("grep", pattern="return", path="src/app.py", output_mode="content")
    assert one_file.output == "src/app.py:2:    return path"


async def test_content_of_one_binary_file_says_it_matches(call: Any, workspace: Path) -> None:
    # rg searches a file it is given by name even when binary, and prints a notice instead of its
    # lines: that notice was no output block, so content mode answered "No matches" where
    # files_with_matches and count found one.
    (workspace / "data.bin").write_bytes(b"load_config\0\x01\x02\n")
    assert (await call("grep", pattern="load_config", path="data.bin")).output == "data.bin"
    result = await call("grep", pattern="load_config", path="data.bin", output_mode="content")
    assert not result.is_error and "No matches" not in result.output, result.output
    assert result.output.startswith("data.bin: binary file matches") and "not shown" in result.output


async def test_a_crlf_line_ends_where_read_shows_it_end(call: Any, workspace: Path) -> None:
    # `$` did not match before a line's \r, and content lines kept it: the model, which read
    # shows such lines without it, found no `foo;$` and got lines ending in a stray \r.
    (workspace / "win.txt").write_bytes(b"foo;\r\nbar\r\nfoo; x\r\n")
    assert (await call("grep", pattern="foo;$", path="win.txt")).output == "win.txt"
    result = await call("grep", pattern="foo;$", path="win.txt", output_mode="content", **{"-A": 1})
    assert result.output.splitlines() == ["win.txt:1:foo;", "win.txt-2-bar"]
    count = await call("grep", pattern="^(foo|bar);?$", path="win.txt", output_mode="count")
    assert count.output == "win.txt:2"


async def test_multiline(call: Any) -> None:
    result = await call("grep", pattern=r"def load_config.*\n.*return", multiline=True, output_mode="content")
    assert result.output.splitlines() == ["src/app.py:1:def load_config(path):", "src/app.py:2:    return path"]


async def test_head_limit_and_offset(call: Any, workspace: Path) -> None:
    many = workspace / "many"
    many.mkdir()
    for index in range(300):
        (many / f"f{index:03}.txt").write_text("needle\n")
    first = await call("grep", pattern="needle")
    lines = first.output.splitlines()
    assert first.truncated and len(lines) == grep.DEFAULT_HEAD_LIMIT + 1
    assert lines[0] == "many/f000.txt"
    assert lines[-1] == "[showing files 1-250 of 300; use offset=250 for more]"
    rest = await call("grep", pattern="needle", offset=250, head_limit=100)
    assert not rest.truncated and rest.output.splitlines()[0] == "many/f250.txt"
    assert len(rest.output.splitlines()) == 50
    page = await call("grep", pattern="needle", output_mode="content", head_limit=2, offset=10)
    assert page.output.splitlines() == [
        "many/f010.txt:1:needle",
        "many/f011.txt:1:needle",
        "[showing lines 11-12 of 300; use offset=12 for more]",
    ]


async def test_deterministic_on_a_wide_tree(call: Any, workspace: Path) -> None:
    for index in range(200):
        directory = workspace / "wide" / f"d{index % 17}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index}.py").write_text("x = 1\nneedle()\ny = 2\nneedle()\n")
    outputs = {(await call("grep", pattern="needle", output_mode="content", head_limit=1000)).output for _ in range(3)}
    assert len(outputs) == 1
    lines = outputs.pop().splitlines()
    paths = [line.split(":")[0] for line in lines]
    assert paths == sorted(paths) and len(lines) == 400


async def test_errors(call: Any) -> None:
    no_match = await call("grep", pattern="zebra")
    assert not no_match.is_error and no_match.output == "No matches for 'zebra' in ."
    bad = await call("grep", pattern="a(")
    assert bad.error_kind is ErrorKind.TOOL_ERROR
    assert "regex parse error" in bad.output and "unclosed group" in bad.output
    bad_type = await call("grep", pattern="x", type="nosuchtype")
    assert bad_type.is_error and "nosuchtype" in bad_type.output
    assert (await call("grep", pattern="x", path="missing")).output == "path not found: missing"
    assert (await call("grep", pattern="x", path="/etc")).error_kind is ErrorKind.PATH_ESCAPE
    past = await call("grep", pattern="load_config", offset=5)
    assert past.is_error and "past the end" in past.output


async def test_a_line_feed_without_multiline_points_at_the_multiline_argument(call: Any) -> None:
    # rg's advice named its own flags ("--multiline", "-U"), which the tool does not take: a model
    # that followed it sent an argument the schema refuses.
    result = await call("grep", pattern="path\\n", output_mode="content")
    assert result.error_kind is ErrorKind.TOOL_ERROR and "multiline=true" in result.output, result.output
    assert "-U" not in result.output and "--multiline" not in result.output
    assert (await call("grep", pattern="path\\n", multiline=True, output_mode="content")).output == (
        "src/app.py:2:    return path"
    )


async def test_pattern_starting_with_dash(call: Any, workspace: Path) -> None:
    (workspace / "flags.txt").write_text("run --verbose\n")
    assert (await call("grep", pattern="--verbose")).output == "flags.txt"


def _process(entry: Path) -> tuple[str, str, int] | None:
    """The name, state and parent pid in /proc/PID/stat; None once the process is reaped."""
    try:
        stat = entry.joinpath("stat").read_text()
    except OSError:
        return None
    state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
    return stat[stat.index("(") + 1 : stat.rindex(")")], state, int(parent)


def _rg_children(written: int) -> list[int]:
    """Pids of this process's running rg children that have written more than `written` bytes
    (a process's state has no event)."""
    pids = []
    for entry in Path("/proc").iterdir():
        process = _process(entry) if entry.name.isdigit() else None
        if process is not None and process[0] == "rg" and process[1] != "Z" and process[2] == os.getpid():
            try:
                io = dict(line.split(": ") for line in entry.joinpath("io").read_text().splitlines())
            except OSError:
                continue
            if int(io["wchar"]) > written:
                pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    process = _process(Path(f"/proc/{pid}"))
    return process is not None and process[1] != "Z"


def _many_matching_lines(workspace: Path) -> None:
    """~18 MB of rg output, file by file: hundreds of times what a pipe holds."""
    for index in range(400):
        (workspace / f"f{index:03}.txt").write_text("x\n" * 5000)


async def test_output_past_the_cap_stops_rg_and_keeps_the_first_bytes(workspace: Path) -> None:
    _many_matching_lines(workspace)
    out = await asyncio.wait_for(run_rg(["--regexp", "x"], workspace, ReadOnlyLauncher(), max_bytes=300_000), 60)
    assert out.overflowed and len(out.stdout) == 300_000
    assert out.returncode == -signal.SIGKILL
    assert not _rg_children(written=0)


async def test_cancel_kills_rg(registry: Any, workspace: Path) -> None:
    # The tool reads one chunk of rg's output per turn of the event loop: rg is looked for once
    # per turn, and found while it has most of its output still to write. It is taken once it
    # has written more than a pipe holds (so the tool is reading it, past starting it), then
    # stopped: only a kill can end it. Then most of what it wrote is still unread in the pipe.
    _many_matching_lines(workspace)
    task = asyncio.create_task(registry.execute("grep", workspace, '{"pattern": "x", "output_mode": "content"}'))
    [pid] = await poll_until(lambda: _rg_children(written=1 << 20), what="grep's rg to be read from", interval=0)
    try:
        os.kill(pid, signal.SIGSTOP)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=60)
        assert done, "the cancelled call never ended: rg's unread output kept it waiting"
        with pytest.raises(asyncio.CancelledError):
            task.result()
        assert not _running(pid), "rg outlived its cancelled grep call"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_names_holding_newlines_keep_their_own_lines_and_counts(call: Any, workspace: Path) -> None:
    # A name may hold LF, two in a row, or a line-number look-alike: rg's output then has empty
    # lines and "N:" lines that are parts of names, not separators or matches.
    (workspace / "a\n\nb.txt").write_text("needle one\nneedle two\n")
    (workspace / "3:c\nd.txt").write_text("x\nneedle three\n")
    content = await call("grep", pattern="needle", output_mode="content", path=".")
    assert content.output == "\n".join([
        "3:c\nd.txt:2:needle three",
        "a\n\nb.txt:1:needle one",
        "a\n\nb.txt:2:needle two",
    ])
    counted = await call("grep", pattern="needle", output_mode="count")
    assert counted.output == "\n".join(["3:c\nd.txt:1", "a\n\nb.txt:2"])
    assert counted.metadata["total"] == 2


def test_a_record_cut_short_by_the_output_cap_is_left_out() -> None:
    assert list(grep._count_records(b"a\0002\nb\0001")) == [(b"a", b"2")]
    assert list(grep._count_records(b"a\0002\nb")) == [(b"a", b"2")]
    data = b"a\x001:x\n\nb\x001:y\n\nc"
    blocks = [(name, data[start : grep._block_end(data, start, name)]) for name, start in grep._content_blocks(data)]
    assert blocks == [(b"a", b"1:x"), (b"b", b"1:y")]


async def test_a_binary_file_stopped_after_a_match_is_said_so_under_its_path(call: Any, workspace: Path) -> None:
    # rg searches a binary file met in a walk up to its first NUL and then prints, in stdout and
    # without a line number, `NAME: WARNING: stopped searching binary file ...`: it was shown
    # glued to its path and first letter ("src/data.binddata.bin: WARNING...").
    (workspace / "src" / "data.bin").write_bytes(b"needle here\n" + b"x" * 70_000 + b"\0\nneedle again\n")
    result = await call("grep", pattern="needle", path="src", output_mode="content")
    lines = result.output.splitlines()
    assert lines[0] == "src/data.bin:1:needle here"
    assert lines[1].startswith("src/data.bin: WARNING: stopped searching binary file after match"), lines
    assert len(lines) == 2 and result.metadata["total"] == 2


def test_a_binary_warning_naming_empty_lines_gives_no_lines_to_another_name() -> None:
    # The warning repeats the file's name, and a name holding an empty line ended the file's
    # block inside it: the rest of the warning and the next file's name made one made-up name,
    # which no rule denies, and the next file's lines were shown under it.
    warning = b': WARNING: stopped searching binary file after match (found "\\0" byte around offset 70014)\n'
    data = b"a\n\nplain\x001:hunter2 decoy\n" + b"a\n\nplain" + warning + b"\nsecrets/key.txt\x001:hunter2 key\n"
    out = RgOutput(returncode=0, stdout=data, stderr="", overflowed=False)
    shown, total, hidden = grep._content_lines(out, "", True, 0, 100, lambda path: path.startswith("secrets/"))
    assert hidden == 1 and total == 2
    assert shown == ["a\n\nplain:1:hunter2 decoy", "a\n\nplain" + warning.decode().rstrip("\n")]
    # A name that starts with LF makes an empty line of the warning's start.
    data = b"\nplain\x001:hunter2 decoy\n" + b"\nplain" + warning + b"\nsecrets/key.txt\x001:hunter2 key\n"
    out = RgOutput(returncode=0, stdout=data, stderr="", overflowed=False)
    shown, total, hidden = grep._content_lines(out, "", True, 0, 100, lambda path: path.startswith("secrets/"))
    assert (shown, total, hidden) == (["\nplain:1:hunter2 decoy", "\nplain" + warning.decode().rstrip("\n")], 2, 1)


def test_content_lines_not_shown_are_counted_without_a_copy_each() -> None:
    # 8 MiB of short lines in one file: a bytes object per line took about six times the output.
    # The lines shown are deep in it, past many of the windows the skip counts in.
    data = b"big.txt\0" + b"".join(b"%d:x\n" % number for number in range(1, 900_001))
    out = RgOutput(returncode=0, stdout=data, stderr="", overflowed=False)
    tracemalloc.start()
    try:
        shown, total, hidden = grep._content_lines(out, "", True, 800_000, 800_002, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (shown, total, hidden) == (["big.txt:800001:x", "big.txt:800002:x"], 900_000, 0)
    assert peak < len(data) // 10


async def test_a_big_output_is_answered_off_the_event_loop() -> None:
    # Up to rg's 64 MiB of matches were parsed on the event loop: seconds in which the worker (or
    # the server, for the calls it runs) answered nothing else.
    loop_thread = threading.get_ident()
    small = RgOutput(0, b"x" * ANSWER_ON_LOOP_BYTES, "", overflowed=False)
    big = RgOutput(0, b"x" * (ANSWER_ON_LOOP_BYTES + 1), "", overflowed=False)
    assert await answer_of(small, threading.get_ident) == loop_thread
    assert await answer_of(big, threading.get_ident) != loop_thread


@pytest.mark.parametrize("mode", ["files_with_matches", "count", "content"])
async def test_a_big_output_answers_as_a_small_one(call: Any, workspace: Path, mode: str) -> None:
    lines = [f"needle {n:07}" for n in range(40_000)]
    (workspace / "many.txt").write_text("\n".join(lines) + "\n")
    for n in range(3_000):
        (workspace / f"f{n:05}-{'x' * 80}.txt").write_text("needle\n")
    result = await call("grep", pattern="needle", output_mode=mode, head_limit=3, offset=1)
    assert not result.is_error, result.output
    total = 43_000 if mode == "content" else 3_001
    assert f"[showing {'lines' if mode == 'content' else 'files'} 2-4 of {total}; use offset=4 for more]" \
        in result.output, result.output
