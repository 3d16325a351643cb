from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tool_worker.tools import grep
from tool_worker.tools.base import ErrorKind


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


async def test_pattern_starting_with_dash(call: Any, workspace: Path) -> None:
    (workspace / "flags.txt").write_text("run --verbose\n")
    assert (await call("grep", pattern="--verbose")).output == "flags.txt"


async def test_cancel_kills_rg(registry: Any, workspace: Path) -> None:
    task = asyncio.create_task(registry.execute("grep", workspace, '{"pattern": "x"}'))
    await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
