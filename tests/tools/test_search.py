from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tool_worker.tools import search
from tool_worker.tools.base import ErrorKind


def test_tokenize_splits_identifiers() -> None:
    assert search.tokenize("loadConfig load_config HTTPServer files v2") == [
        "load",
        "config",
        "load",
        "config",
        "http",
        "server",
        "file",
        "v",
        "2",
    ]


def test_tokenize_keeps_words_of_other_scripts() -> None:
    # Only ASCII letters made words: "日本語" or "Ärger" alone was "a query without words".
    assert search.tokenize("Ärger café naïveFiles x2") == ["ärger", "café", "naïvefile", "x", "2"]
    # Scripts without spaces between words: overlapping pairs, so a word matches inside a run.
    assert search.tokenize("日本語のテキスト 語") == ["日本", "本語", "語の", "のテ", "テキ", "キス", "スト", "語"]
    assert search.tokenize("한국어abc") == ["한국", "국어", "abc"]


async def test_finds_text_in_other_scripts(call: Any, workspace: Path) -> None:
    (workspace / "docs").mkdir()
    (workspace / "docs" / "ja.md").write_text("# 設定\n\n日本語のテキストを読み込む設定ファイル。\n")
    (workspace / "docs" / "fr.md").write_text("Le café est prêt.\n")
    japanese = await call("search", query="テキスト", path="docs")
    assert not japanese.is_error and japanese.output.startswith("1. docs/ja.md (score "), japanese.output
    assert "      3: 日本語のテキストを読み込む設定ファイル。" in japanese.output
    french = await call("search", query="Café", path="docs")
    assert french.output.startswith("1. docs/fr.md (score ") and "fr.md" in french.output


async def test_ranks_relevant_files_with_snippets(call: Any, workspace: Path) -> None:
    (workspace / "src" / "retry.py").write_text(
        "import time\n\n\ndef compute_backoff(attempt):\n    # retry backoff doubles\n"
        "    return 2 ** attempt\n\n\ndef retry(call):\n    backoff = compute_backoff(1)\n"
    )
    (workspace / "src" / "other.py").write_text("def unrelated():\n    return 'retry later'\n")
    result = await call("search", query="where is the retry backoff computed")
    assert not result.is_error
    blocks = result.output.split("\n\n")
    assert blocks[0].startswith("1. src/retry.py (score ")
    assert "      4: def compute_backoff(attempt):" in blocks[0]
    assert "other.py" in blocks[1]
    camel = await call("search", query="load config")
    names = [block.splitlines()[0].split()[1] for block in camel.output.split("\n\n")]
    # build/out.py is gitignored; the JS camelCase name matches too.
    assert set(names) == {"src/app.py", "src/pkg/util.py", "src/pkg/web.js"}


async def test_deterministic_ties_and_limit(call: Any, workspace: Path) -> None:
    corpus = workspace / "corpus"
    corpus.mkdir()
    for index in range(15):
        (corpus / f"f{index:02}.txt").write_text("widget\n")
    result = await call("search", query="widget", path="corpus", limit=3)
    heads = [block.splitlines()[0] for block in result.output.split("\n\n")]
    assert [head.split()[1] for head in heads[:3]] == ["corpus/f00.txt", "corpus/f01.txt", "corpus/f02.txt"]
    assert result.truncated and heads[3] == "[showing the best 3 of 15 matching files; raise limit to see more]"


async def test_skips_large_and_binary_files(call: Any, workspace: Path) -> None:
    (workspace / "huge.txt").write_text("gadget\n" * (search.MAX_FILE_BYTES // 7 + 10))
    (workspace / "blob.bin").write_bytes(b"gadget\0\0")
    result = await call("search", query="gadget")
    assert result.output.startswith("No files match 'gadget'")
    assert result.truncated and f"1 files over {search.MAX_FILE_BYTES} bytes were not searched" in result.output


async def test_total_bytes_cap(call: Any, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "MAX_TOTAL_BYTES", 60)
    result = await call("search", query="load config")
    assert result.truncated and "stopped after reading 60 bytes" in result.output


async def test_query_without_words(call: Any) -> None:
    result = await call("search", query="!!! ???")
    assert result.error_kind is ErrorKind.INVALID_ARGUMENTS
