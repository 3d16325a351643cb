"""write, edit, delete, move and copy."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import copy, edit, read
from tool_worker.tools.base import ErrorKind, ToolFailure
from tool_worker.tools.write import INLINE_WRITE_CHARS


async def test_write_creates_parents_and_overwrites(call: Any, workspace: Path) -> None:
    created = await call("write", file_path="new/deep/file.txt", content="héllo\n")
    assert not created.is_error and created.output == "Created new/deep/file.txt (7 bytes)"
    assert (workspace / "new" / "deep" / "file.txt").read_text() == "héllo\n"
    os.chmod(workspace / "README.md", 0o755)
    overwritten = await call("write", file_path="README.md", content="new")
    assert overwritten.output.startswith("Overwrote README.md")
    assert (workspace / "README.md").read_text() == "new"
    assert stat.S_IMODE((workspace / "README.md").stat().st_mode) == 0o755
    assert not [name for name in os.listdir(workspace) if name.endswith(".tmp")]


@pytest.mark.parametrize("characters", [INLINE_WRITE_CHARS, INLINE_WRITE_CHARS + 1])
async def test_write_on_the_loop_and_in_a_thread_alike(call: Any, workspace: Path, characters: int) -> None:
    # Up to INLINE_WRITE_CHARS the write runs on the event loop, past it in a thread: same file,
    # same answer, same errors either way.
    content = ("é" * (characters - 1)) + "\n"
    result = await call("write", file_path="big/file.txt", content=content)
    assert result.output == f"Created big/file.txt ({len(content.encode())} bytes)"
    assert (workspace / "big" / "file.txt").read_text(encoding="utf-8") == content
    (workspace / "big" / "dir").mkdir()
    refused = await call("write", file_path="big/dir", content=content)
    assert refused.is_error and "dir is a directory" in refused.output
    assert not [name for name in os.listdir(workspace / "big") if name.endswith(".tmp")]


@pytest.mark.parametrize("content", ["small\n", "big" + "x" * INLINE_WRITE_CHARS])
async def test_write_and_edit_a_file_whose_name_is_255_bytes(call: Any, workspace: Path, content: str) -> None:
    # The temporary file was named ".NAME.XXXXXXXX.tmp", 14 bytes past a name the file system
    # takes at most: every write or edit of such a file failed with "File name too long".
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    (workspace / name).write_text("old\n")
    written = await call("write", file_path=name, content=content)
    assert not written.is_error, written.output
    edited = await call("edit", file_path=name, old_string=content[:3], new_string="new")
    assert not edited.is_error, edited.output
    assert (workspace / name).read_text() == "new" + content[3:]
    assert sorted(os.listdir(workspace)) == sorted([".gitignore", "README.md", "build", "debug.log", "src", name])


async def test_a_lone_surrogate_is_the_callers_mistake_and_changes_nothing(call: Any, workspace: Path) -> None:
    # JSON's "\\ud800" decodes to a lone surrogate, which UTF-8 cannot encode.
    before = (workspace / "src" / "app.py").read_bytes()
    written = await call("write", file_path="lone.txt", content="a\ud800b")
    edited = await call("edit", file_path="src/app.py", old_string="return path", new_string="\udfff")
    assert written.error_kind is ErrorKind.INVALID_ARGUMENTS
    assert "content holds a lone surrogate (U+D800)" in written.output
    assert edited.error_kind is ErrorKind.INVALID_ARGUMENTS
    assert "new_string holds a lone surrogate (U+DFFF)" in edited.output
    assert not (workspace / "lone.txt").exists()
    assert (workspace / "src" / "app.py").read_bytes() == before


async def test_write_errors(call: Any, workspace: Path) -> None:
    assert (await call("write", file_path="src", content="x")).is_error
    assert (await call("write", file_path="../escape.txt", content="x")).error_kind is ErrorKind.PATH_ESCAPE
    assert not (workspace.parent / "escape.txt").exists()


async def test_write_to_a_path_ending_with_a_slash_is_refused(call: Any, workspace: Path) -> None:
    # "notes/" names a directory: a file named "notes" holding the content was created instead.
    result = await call("write", file_path="notes/", content="x")
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS and "ends with '/'" in result.output
    assert not (workspace / "notes").exists()


async def test_a_file_where_a_parent_directory_should_be_is_named(call: Any, workspace: Path) -> None:
    # mkdir said only "File exists" (or "Not a directory"), naming nothing.
    for tool, arguments in (
        ("write", {"file_path": "README.md/new.txt", "content": "x"}),
        ("write", {"file_path": "README.md/deeper/new.txt", "content": "x"}),
        ("copy", {"source": "src/app.py", "destination": "README.md/app.py"}),
        ("move", {"source": "src/app.py", "destination": "README.md/deeper/app.py"}),
    ):
        result = await call(tool, **arguments)
        assert result.is_error and "README.md is a file, not a directory" in result.output, (tool, result.output)
    assert (workspace / "README.md").read_text() == "# Demo\n" and (workspace / "src" / "app.py").exists()


async def test_edit(call: Any, workspace: Path) -> None:
    result = await call("edit", file_path="src/app.py", old_string="return path", new_string="return str(path)")
    assert result.output == "Edited src/app.py: replaced 1 occurrence"
    assert "    return str(path)\n" in (workspace / "src" / "app.py").read_text()


async def test_edit_keeps_crlf(call: Any, workspace: Path) -> None:
    (workspace / "dos.txt").write_bytes(b"one\r\ntwo\r\n")
    await call("edit", file_path="dos.txt", old_string="two", new_string="2")
    assert (workspace / "dos.txt").read_bytes() == b"one\r\n2\r\n"


async def test_edit_of_lines_as_read_shows_them_in_a_crlf_file(call: Any, workspace: Path) -> None:
    # read shows a CRLF file's lines without their \r, so the model's old_string spans lines with
    # \n alone: it found nothing, and no text the model could copy from read ever matched.
    (workspace / "dos.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n")
    shown = await call("read", file_path="dos.txt")
    assert "\r" not in shown.output
    result = await call("edit", file_path="dos.txt", old_string="one\ntwo", new_string="1\n2\n2.5")
    assert result.output == "Edited dos.txt: replaced 1 occurrence"
    assert (workspace / "dos.txt").read_bytes() == b"1\r\n2\r\n2.5\r\nthree\r\n"
    # Text that matches as given is replaced as given, \r or not.
    assert not (await call("edit", file_path="dos.txt", old_string="2\r\n2.5", new_string="x\ny")).is_error
    assert (workspace / "dos.txt").read_bytes() == b"1\r\nx\ny\r\nthree\r\n"


async def test_edit_not_unique_and_replace_all(call: Any, workspace: Path) -> None:
    (workspace / "dup.txt").write_text("x = 1\nx = 1\nx = 1\n")
    ambiguous = await call("edit", file_path="dup.txt", old_string="x = 1", new_string="x = 2")
    assert ambiguous.is_error and "occurs 3 times" in ambiguous.output and "replace_all" in ambiguous.output
    assert (workspace / "dup.txt").read_text() == "x = 1\nx = 1\nx = 1\n"
    result = await call("edit", file_path="dup.txt", old_string="x = 1", new_string="x = 2", replace_all=True)
    assert result.output == "Edited dup.txt: replaced 3 occurrences"
    assert (workspace / "dup.txt").read_text() == "x = 2\nx = 2\nx = 2\n"


async def test_edit_refuses_an_old_string_whose_occurrences_overlap(call: Any, workspace: Path) -> None:
    # "}\n}\n" occurs twice in "}\n}\n}\n" (at the first and the second brace), but str.count
    # counts one: the first was replaced, whichever the model meant, as if it were unique.
    (workspace / "braces.txt").write_text("}\n}\n}\n")
    ambiguous = await call("edit", file_path="braces.txt", old_string="}\n}\n", new_string="end\n")
    assert ambiguous.is_error and "more than once" in ambiguous.output
    assert (workspace / "braces.txt").read_text() == "}\n}\n}\n"


async def test_edit_errors(call: Any) -> None:
    missing_text = await call("edit", file_path="src/app.py", old_string="nowhere", new_string="x")
    assert missing_text.is_error and "old_string was not found in src/app.py" in missing_text.output
    missing_file = await call("edit", file_path="nope.py", old_string="a", new_string="b")
    assert missing_file.is_error and "file not found: nope.py" in missing_file.output
    same = await call("edit", file_path="src/app.py", old_string="def", new_string="def")
    assert same.error_kind is ErrorKind.INVALID_ARGUMENTS


async def test_edit_refuses_a_file_too_big_to_hold_in_memory(call: Any, workspace: Path) -> None:
    # edit runs in the server's process: a command's `truncate -s 20G f` (no disk used) and an edit
    # of f had it read 20 GB and decode them, until the kernel's OOM killer ended the server.
    big = workspace / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(edit.MAX_EDIT_BYTES + 1)
    result = await call("edit", file_path="big.txt", old_string="zzz", new_string="y")
    assert result.error_kind is ErrorKind.TOOL_ERROR
    assert f"big.txt is {edit.MAX_EDIT_BYTES + 1:,} bytes" in result.output
    assert "sed" in result.output
    assert big.stat().st_size == edit.MAX_EDIT_BYTES + 1


async def test_delete(call: Any, workspace: Path) -> None:
    assert (await call("delete", path="README.md")).output == "Deleted README.md"
    assert not (workspace / "README.md").exists()
    refused = await call("delete", path="src")
    assert refused.is_error and "recursive=true" in refused.output and (workspace / "src").is_dir()
    assert not (await call("delete", path="src", recursive=True)).is_error
    assert not (workspace / "src").exists()
    assert "does not exist" in (await call("delete", path="ghost")).output
    assert (await call("delete", path=".", recursive=True)).is_error and (workspace / ".gitignore").exists()


async def test_delete_symlink_removes_the_link_only(call: Any, workspace: Path, tmp_path: Path) -> None:
    (workspace / "inner").symlink_to(workspace / "src")
    (tmp_path / "keep.txt").write_text("keep")
    (workspace / "outer").symlink_to(tmp_path / "keep.txt")
    assert not (await call("delete", path="inner")).is_error
    assert (workspace / "src" / "app.py").exists() and not (workspace / "inner").exists()
    assert not (await call("delete", path="outer")).is_error
    assert (tmp_path / "keep.txt").read_text() == "keep"


async def test_move(call: Any, workspace: Path) -> None:
    result = await call("move", source="src/app.py", destination="lib/main.py")
    assert result.output == "Moved src/app.py to lib/main.py"
    assert (workspace / "lib" / "main.py").exists() and not (workspace / "src" / "app.py").exists()
    exists = await call("move", source="README.md", destination="lib/main.py")
    assert exists.is_error and "overwrite=true" in exists.output
    assert not (await call("move", source="README.md", destination="lib/main.py", overwrite=True)).is_error
    assert (workspace / "lib" / "main.py").read_text() == "# Demo\n"
    assert "source not found" in (await call("move", source="ghost", destination="x")).output
    into_itself = await call("move", source="src", destination="src/pkg/inner")
    assert into_itself.is_error and (workspace / "src").is_dir()


async def test_copy(call: Any, workspace: Path) -> None:
    assert (await call("copy", source="README.md", destination="docs/README.md")).output == (
        "Copied README.md to docs/README.md"
    )
    assert (workspace / "docs" / "README.md").read_text() == "# Demo\n"
    tree = await call("copy", source="src", destination="src_copy")
    assert tree.output == "Copied directory src to src_copy"
    assert (workspace / "src_copy" / "pkg" / "util.py").exists()
    again = await call("copy", source="src", destination="src_copy")
    assert again.is_error and "overwrite=true" in again.output
    (workspace / "src_copy" / "stale.txt").write_text("stale")
    assert not (await call("copy", source="src", destination="src_copy", overwrite=True)).is_error
    assert not (workspace / "src_copy" / "stale.txt").exists()


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("write", {"file_path": "/tmp/codelane-escape.txt", "content": "x"}),
        ("edit", {"file_path": "../outside.txt", "old_string": "a", "new_string": "b"}),
        ("delete", {"path": "../outside.txt"}),
        ("move", {"source": "README.md", "destination": "../moved.txt"}),
        ("move", {"source": "../outside.txt", "destination": "inside.txt"}),
        ("copy", {"source": "../outside.txt", "destination": "inside.txt"}),
        ("copy", {"source": "README.md", "destination": "../copied.txt"}),
        ("copy", {"source": "out/secret.txt", "destination": "inside.txt"}),
    ],
)
async def test_escapes_touch_nothing(call: Any, workspace: Path, tool: str, arguments: dict[str, Any]) -> None:
    outside = workspace.parent / "outside.txt"
    outside.write_text("a")
    secret_dir = workspace.parent / "secret"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text("s")
    (workspace / "out").symlink_to(secret_dir)
    before = sorted(os.listdir(workspace)), sorted(os.listdir(workspace.parent))
    result = await call(tool, **arguments)
    assert result.error_kind is ErrorKind.PATH_ESCAPE, result.output
    assert outside.read_text() == "a" and (workspace / "README.md").exists()
    assert "codelane-escape.txt" not in os.listdir("/tmp")
    assert (sorted(os.listdir(workspace)), sorted(os.listdir(workspace.parent))) == before


async def test_a_utf16_file_is_read_decoded_and_edit_says_what_to_do(call: Any, workspace: Path) -> None:
    # Its NUL bytes made read call it binary, while grep (rg decodes UTF-16) showed its lines.
    for name, encoding in (("le.txt", "utf-16"), ("be.txt", "utf-16-be")):
        data = "first line\r\nzweite Zeile ü\r\n".encode(encoding)
        (workspace / name).write_bytes(data if encoding == "utf-16" else b"\xfe\xff" + data)
        result = await call("read", file_path=name)
        assert not result.is_error
        assert result.output.splitlines() == ["     1\tfirst line", "     2\tzweite Zeile ü", read.UTF16_NOTICE]
    big = "x" * 40 + "\n"
    (workspace / "big.txt").write_bytes((big * 2000).encode("utf-16"))  # past the inline read: in a thread
    window = await call("read", file_path="big.txt", offset=1999, limit=5)
    assert window.output.splitlines()[:2] == ["  1999\t" + "x" * 40, "  2000\t" + "x" * 40]
    edited = await call("edit", file_path="le.txt", old_string="first", new_string="1st")
    assert edited.is_error and "is UTF-16 text" in edited.output and "iconv" in edited.output


@pytest.mark.parametrize("end", ["source", "destination"])
def test_copy_never_waits_on_a_fifo_put_in_place_of_a_file(tmp_path: Path, end: str) -> None:
    # A command beside the call may swap a file it was about to copy (or the destination it
    # cleared) for a FIFO: an open() of it waits for the other end for ever, where the call's stop
    # flag cannot reach it. Called directly, as the swap would leave it.
    source, destination = tmp_path / "source", tmp_path / "destination"
    os.mkfifo(source if end == "source" else destination)
    if end == "destination":
        source.write_text("data\n")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            copy._copy_file(source, destination, threading.Event(), "source")
            outcome.append(None)
        except BaseException as exc:  # what it raised is the outcome
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)  # a regression leaves it blocked, not the run
    worker.start()
    worker.join(30)
    assert outcome, "the copy blocked opening a FIFO"
    if end == "source":
        assert isinstance(outcome[0], ToolFailure) and "FIFO" in str(outcome[0]), outcome
    else:
        assert isinstance(outcome[0], OSError), outcome
