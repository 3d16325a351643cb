"""The index of a workspace: current at every call, built once per content, kept on disk.

These tests run semantic_search with the real model (loaded once), counting the chunk texts it
embeds: that count is what an index build costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from tests.fake_rg import install_failing_rg
from tests.polling import poll_until
from tests.semantic import EXTRA_MISSING
from tests.semantic.conftest import CountingEmbedder, GatedEmbedder, searcher
from tool_worker.sandbox import workspace_root
from tool_worker.tools.base import ErrorKind

RETRY = '''"""Retrying failed requests."""
import time


def compute_backoff(attempt):
    """Seconds to wait before trying a failed request again: doubles with every attempt."""
    return 2 ** attempt


class RetryPolicy:
    """How many times a request is retried."""

    def should_retry(self, status):
        return status >= 500
'''
CONFIG = '''def load_settings(path):
    """Read the YAML settings file and check every key against the schema."""
    with open(path) as handle:
        return parse(handle.read())
'''
GUIDE = "# Guide\n\nHow to install the client\nand where the settings file lives.\n"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "retry.py").write_text(RETRY)
    (root / "src" / "config.py").write_text(CONFIG)
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text(GUIDE)
    return root


def _state(embedder: Any, cache: Path, **options: Any) -> Any:
    from tool_worker.semantic.tool import SemanticSearch

    return SemanticSearch(embedder, cache, **options)


def _paths(result: Any) -> list[str]:
    return [hit["path"] for hit in result.metadata["results"]]


async def test_finds_code_by_meaning_and_says_how_it_ranked(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    result = await search(query="wait longer after each unsuccessful attempt")
    assert not result.is_error, result.output
    first = result.metadata["results"][0]
    assert (first["path"], first["symbol"], first["kind"]) == ("src/retry.py", "compute_backoff", "function")
    assert (first["start_line"], first["end_line"]) == (5, 7)
    assert first["found_by"] in ("both", "semantic") and first["semantic_rank"] is not None
    lines = result.output.splitlines()
    assert lines[2].startswith("1. src/retry.py:5-7 compute_backoff (function), found by ")
    assert "semantic #" in lines[2]
    assert lines[3] == "      5: def compute_backoff(attempt):"
    assert result.metadata["chunks"] == result.metadata["embedded"] > 0
    assert not result.truncated


async def test_only_changed_content_is_embedded_again(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    await search(query="settings file")
    # Each chunk's code, and for a named chunk with documentation also its name and documentation:
    # 6 chunks, 5 named, 3 of them documented (should_retry and the Markdown section are not).
    built = embedder.documents
    assert built == 6 + 3
    await search(query="settings file")
    assert embedder.documents == built  # nothing changed, nothing embedded

    (workspace / "src" / "config.py").write_text(CONFIG + "\n\ndef save_settings(path, values):\n    pass\n")
    changed = await search(query="write the settings back to disk")
    # The new function's code (it has no documentation, so no summary); load_settings is
    # unchanged and keeps its vectors.
    assert embedder.documents == built + 1
    assert changed.metadata["results"][0]["symbol"] == "save_settings"

    (workspace / "src" / "config.py").write_text(CONFIG)  # back to content the index has seen
    reverted = await search(query="write the settings back to disk")
    assert embedder.documents == built + 1
    assert "save_settings" not in {hit["symbol"] for hit in reverted.metadata["results"]}


@pytest.mark.parametrize("how", ["killed", "failed"])
async def test_a_listing_that_failed_leaves_the_index_whole(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # rg's listing is what the refresh keeps: an empty one (rg failed) or the start of one (rg
    # killed) dropped every other file from the index, to be embedded again at the next call.
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    await search(query="settings file")
    built = embedder.documents
    (workspace / "src" / "new.py").write_text("def fresh():\n    pass\n")  # the next call lists again
    with monkeypatch.context() as patched:
        install_failing_rg(patched, tmp_path, how)
        failed = await search(query="settings file")
    assert failed.is_error
    assert "listing the workspace failed" in failed.output or "ripgrep was killed" in failed.output
    result = await search(query="wait longer after each unsuccessful attempt")
    assert not result.is_error, result.output
    assert "src/retry.py" in _paths(result)
    assert embedder.documents == built + 1  # only the new file: nothing else was dropped


async def test_a_listing_cut_short_drops_nothing_and_says_the_index_is_capped(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rg's listing is read up to MAX_LISTING_BYTES (64 MiB of names, a tree far past the index's
    # own cap). Taken as whole, a cut listing dropped every file past the cut from the index.
    from tool_worker.semantic import tool as semantic_tool

    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    await search(query="settings file")
    (workspace / "src" / "new.py").write_text("def fresh():\n    pass\n")  # the next call lists again
    monkeypatch.setattr(semantic_tool, "MAX_LISTING_BYTES", len(b"src/config.py\0"))  # about one name
    result = await search(query="wait longer after each unsuccessful attempt", limit=50)
    assert not result.is_error, result.output
    assert "only the first files by path are indexed" in result.output
    assert {"src/retry.py", "src/config.py", "docs/guide.md"} <= set(_paths(result))


async def test_a_text_in_several_files_is_embedded_once(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # Two new contents that share load_settings (the same code and summary): the build embeds its
    # two texts once, and both files get its vectors.
    (workspace / "src" / "copy.py").write_text(CONFIG + "\n\ndef save_settings(path, values):\n    pass\n")
    result = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="read the settings file", limit=50)
    assert embedder.documents == 6 + 3 + 1  # the workspace's texts, and save_settings' code
    assert result.metadata["embedded"] == result.metadata["chunks"] == 6 + 2
    hits = {(hit["path"], hit["symbol"]): hit for hit in result.metadata["results"]}
    original, copy = hits["src/config.py", "load_settings"], hits["src/copy.py", "load_settings"]
    assert original["semantic_rank"] is not None and copy["semantic_rank"] is not None
    assert abs(original["semantic_rank"] - copy["semantic_rank"]) == 1  # the same similarity


async def test_a_text_embedded_by_an_earlier_batch_is_not_embedded_again(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # The first search's build is done (its batch embedded) before the copy exists: the copy's
    # batch finds load_settings' two texts among those embedded lately.
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    await search(query="read the settings file")
    assert embedder.documents == 6 + 3
    (workspace / "src" / "copy.py").write_text(CONFIG + "\n\ndef save_settings(path, values):\n    pass\n")
    result = await search(query="read the settings file", limit=50)
    assert embedder.documents == 6 + 3 + 1  # only save_settings' code
    assert result.metadata["embedded"] == result.metadata["chunks"]


async def test_copies_and_restarts_reuse_the_index_by_content(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    original = await searcher(_state(embedder, cache), workspace)(query="retry a failed request")
    built = embedder.documents
    assert built > 0
    copy = tmp_path / "copy"
    shutil.copytree(workspace, copy)
    in_copy = await searcher(_state(embedder, cache), copy)(query="retry a failed request")
    restarted = await searcher(_state(embedder, cache), workspace)(query="retry a failed request")
    assert embedder.documents == built  # another workspace, another worker process: same content
    assert in_copy.metadata["results"] == original.metadata["results"] == restarted.metadata["results"]


async def test_deleted_files_leave_the_index_and_later_the_disk(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    state = _state(embedder, tmp_path / "cache")
    search = searcher(state, workspace)
    await search(query="settings")
    digest = state.index_for(workspace_root(workspace))._files["src/config.py"].digest
    (workspace / "src" / "config.py").unlink()
    result = await search(query="read the YAML settings file")
    assert "src/config.py" not in _paths(result)
    assert state.store.chunks(digest) is not None  # kept a while, for an undo
    assert state.store.purge(released_before_ns=time.time_ns()) == 1
    assert state.store.chunks(digest) is None


async def test_a_same_size_rewrite_within_the_clock_tick_is_seen(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    target = workspace / "src" / "config.py"
    await search(query="settings")
    before = target.stat()
    # Same size, same modification time: only the content tells them apart.
    target.write_text(CONFIG.replace("Read the YAML", "Scan the TOML"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    result = await search(query="TOML")
    assert "results" in result.metadata, result.output
    assert result.metadata["results"][0]["path"] == "src/config.py"
    assert result.metadata["results"][0]["keyword_rank"] == 1


@pytest.mark.parametrize("restarted", [False, True])
async def test_a_same_size_rewrite_that_keeps_an_old_modification_time_is_seen(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, restarted: bool
) -> None:
    # cp -p, tar, rsync -a and a worker's synced copy write new content under the file's old
    # modification time; only the status change time (which no one can set back) shows it.
    target = workspace / "src" / "config.py"
    old = time.time_ns() - 3600 * 10**9
    os.utime(target, ns=(old, old))
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    await search(query="settings")
    target.write_text(CONFIG.replace("Read the YAML", "Scan the TOML"))
    os.utime(target, ns=(old, old))
    if restarted:  # the stat cache on disk, not the one in memory
        search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    result = await search(query="TOML")
    assert result.metadata["results"][0]["path"] == "src/config.py", result.output
    assert result.metadata["results"][0]["keyword_rank"] == 1


async def test_kind_and_path_narrow_the_results(embedder: CountingEmbedder, workspace: Path, tmp_path: Path) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    docs = await search(query="where do the settings live", kind="docs")
    assert set(_paths(docs)) == {"docs/guide.md"}
    code = await search(query="where do the settings live", kind="code")
    assert "docs/guide.md" not in _paths(code) and _paths(code)
    only_src = await search(query="where do the settings live", path="src")
    assert _paths(only_src) and all(path.startswith("src/") for path in _paths(only_src))
    one_file = await search(query="retry", path="src/retry.py", limit=1)
    assert _paths(one_file) == ["src/retry.py"]


@pytest.mark.parametrize(
    ("arguments", "kind", "needle"),
    [
        ({"query": "   "}, ErrorKind.INVALID_ARGUMENTS, "query is blank"),
        ({"query": ""}, ErrorKind.INVALID_ARGUMENTS, "query"),
        ({"query": "x", "path": "../outside"}, ErrorKind.PATH_ESCAPE, "escapes the workspace"),
        ({"query": "x", "path": "/etc"}, ErrorKind.PATH_ESCAPE, "escapes the workspace"),
        ({"query": "x", "path": "nowhere"}, ErrorKind.TOOL_ERROR, "no such file or directory: nowhere"),
        ({"query": "x", "limit": 0}, ErrorKind.INVALID_ARGUMENTS, "limit"),
        ({"query": "x", "kind": "tests"}, ErrorKind.INVALID_ARGUMENTS, "kind"),
        ({"query": "x", "mode": "fast"}, ErrorKind.INVALID_ARGUMENTS, "mode"),
        ({"query": "x" * 2001}, ErrorKind.INVALID_ARGUMENTS, "query"),
        # JSON's "\ud800": UTF-8 cannot encode it, no file has it (was INTERNAL, UnicodeEncodeError).
        ({"query": "x", "path": "src/\ud800"}, ErrorKind.INVALID_ARGUMENTS, "lone surrogate (U+D800)"),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, arguments: dict, kind: ErrorKind, needle: str
) -> None:
    state = _state(embedder, tmp_path / "cache")
    result = await searcher(state, workspace)(**arguments)
    assert result.is_error and result.error_kind is kind, result.output
    assert needle in result.output
    assert embedder.documents == 0 and state.index_for(workspace_root(workspace)).chunk_count() == 0


async def test_ignored_binary_large_and_outside_files_are_not_indexed(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.py"
    secret.write_text('def private_retry_token():\n    """Retry the secret request."""\n')
    (workspace / "src" / "linked.py").symlink_to(secret)
    (workspace / ".gitignore").write_text("build/\n")
    (workspace / "build").mkdir()
    (workspace / "build" / "generated.py").write_text(RETRY.replace("compute_backoff", "generated_backoff"))
    (workspace / "blob.bin").write_bytes(b"retry\0backoff" * 100)
    (workspace / "huge.py").write_text("def huge_retry():\n    pass\n" + "# retry\n" * 200_000)
    result = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="retry backoff", limit=50)
    paths = set(_paths(result))
    assert paths and not paths & {"src/linked.py", "build/generated.py", "blob.bin", "huge.py"}
    assert "[1 files over 1024 KiB are not indexed]" in result.output


async def test_a_call_answers_from_keywords_while_the_model_is_busy(
    real_embedder: Any, workspace: Path, tmp_path: Path
) -> None:
    gate = threading.Event()

    search = searcher(_state(GatedEmbedder(real_embedder, gate), tmp_path / "cache", embed_wait=0.0), workspace)
    try:
        waiting = await search(query="compute backoff")
        assert not waiting.is_error, waiting.output
        assert waiting.metadata["embedded"] == 0 < waiting.metadata["chunks"]
        assert waiting.metadata["results"][0]["symbol"] == "compute_backoff"
        assert waiting.metadata["results"][0]["found_by"] == "keyword"
        assert "[the index is still being built: 0 of" in waiting.output and waiting.truncated
    finally:
        gate.set()
    done = await searcher(_state(real_embedder, tmp_path / "cache"), workspace)(query="compute backoff")
    assert done.metadata["embedded"] == done.metadata["chunks"]


async def test_a_function_just_written_ranks_by_its_keywords_while_its_vector_waits(
    real_embedder: Any, workspace: Path, tmp_path: Path
) -> None:
    await searcher(_state(real_embedder, tmp_path / "cache"), workspace)(query="settings")  # all embedded
    (workspace / "src" / "quota.py").write_text(
        'def refill_quota_bucket(bucket):\n    """Refill the rate limiter quota bucket."""\n    bucket.refill()\n')
    gate = threading.Event()

    search = searcher(_state(GatedEmbedder(real_embedder, gate), tmp_path / "cache", embed_wait=0.0), workspace)
    try:
        result = await search(query="refill the quota bucket of the rate limiter")
    finally:
        gate.set()
    assert result.metadata["embedded"] < result.metadata["chunks"], result.output
    first = result.metadata["results"][0]
    assert (first["symbol"], first["found_by"]) == ("refill_quota_bucket", "keyword"), result.output


async def test_calls_waiting_for_the_model_leave_the_workers_shared_threads_free(
    real_embedder: Any, workspace: Path, tmp_path: Path
) -> None:
    # A call waits for its content's vectors (up to embed_wait) on a thread. On the worker's
    # shared threads (asyncio's default executor: a handful on a small host) enough such calls held
    # every one, and the worker's syncs and its other tools' calls waited behind them (7 s seen).
    gate = threading.Event()

    search = searcher(_state(GatedEmbedder(real_embedder, gate), tmp_path / "cache", embed_wait=600.0), workspace)
    shared_threads = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor

    def waiting() -> int:
        return sum(1 for frame in sys._current_frames().values()
                   if any(f.f_code.co_name == "wait_embedded" for f, _ in traceback.walk_stack(frame)))

    calls = [asyncio.create_task(search(query=f"settings {n}")) for n in range(shared_threads)]
    try:
        await poll_until(lambda: waiting() == shared_threads, what="every call waiting for the model", within=60)
        # The bound only turns the starvation (until the calls' 600 s wait ends) into a failure.
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 30)
    finally:
        gate.set()
    assert not any(result.is_error for result in await asyncio.gather(*calls))


async def test_concurrent_calls_build_once(embedder: CountingEmbedder, workspace: Path, tmp_path: Path) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    results = await asyncio.gather(*(search(query=f"settings {n}") for n in range(4)))
    assert not any(result.is_error for result in results)
    assert embedder.documents == 6 + 3  # each text once (see test_only_changed_content_is_embedded_again)


async def test_a_failed_embedding_is_retried_by_the_next_call(
    real_embedder: Any, workspace: Path, tmp_path: Path
) -> None:
    class FailingOnce(CountingEmbedder):
        failed = False

        def encode_documents(self, texts: list[str]) -> Any:
            if not self.failed:
                self.failed = True
                raise RuntimeError("out of memory")
            return super().encode_documents(texts)

    embedder = FailingOnce(real_embedder)
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    first = await search(query="compute backoff")
    assert not first.is_error, first.output
    again = await search(query="compute backoff")
    assert again.metadata["embedded"] == again.metadata["chunks"] > 0
    assert again.metadata["results"][0]["symbol"] == "compute_backoff"


async def test_an_index_cache_on_a_full_disk_costs_the_cache_not_the_answers(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # Every write of the store failed ("database or disk is full", or a read-only cache): one call
    # failed INTERNAL, the next answered "Nothing here is indexed yet" (the builder forgot each file
    # whose vectors it could not store), and each call embedded the whole workspace again.
    state = _state(embedder, tmp_path / "cache")
    (pages,) = state.store._db.execute("PRAGMA page_count").fetchone()
    state.store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL
    search = searcher(state, workspace)
    first = await search(query="wait longer after each unsuccessful attempt")
    assert not first.is_error, first.output
    assert _paths(first)[0] == "src/retry.py"
    assert first.metadata["embedded"] == first.metadata["chunks"] > 0
    built = embedder.documents
    (workspace / "src" / "config.py").touch()  # a change: the next call refreshes
    again = await search(query="wait longer after each unsuccessful attempt")
    assert again.metadata == first.metadata and embedder.documents == built


async def test_after_a_restart_an_edit_embeds_only_the_changed_chunks(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="retry")
    built = embedder.documents
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)  # a new worker process
    (workspace / "src" / "retry.py").write_text(RETRY.replace("return status >= 500", "return status in (502, 503)"))
    result = await search(query="which status codes are retried")
    assert embedder.documents == built + 1  # should_retry's code (undocumented: no summary); the rest came from disk
    assert result.metadata["embedded"] == result.metadata["chunks"]


async def test_paths_the_policy_denies_are_never_read_nor_shown(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)

    # A session without the denial indexes every file; the index is shared with the next one.
    assert "src/retry.py" in _paths(await search(query="wait longer after each unsuccessful attempt"))
    denied = await search(denied=("src/retry.py",), query="wait longer after each unsuccessful attempt", limit=50)
    assert not denied.is_error, denied.output
    assert "src/retry.py" not in _paths(denied) and "compute_backoff" not in denied.output

    refused = await search(denied=("src/**",), query="settings", path="src/config.py")
    assert refused.is_error and refused.error_kind is ErrorKind.PERMISSION_DENIED, refused.output
    assert "YAML" not in refused.output


async def test_a_session_learns_nothing_of_denied_files_from_the_scores_and_counts(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # BM25's document frequencies and average length, and the chunk counts, took in the denied
    # files that another session had indexed: a session that may not read secret/ wrote a file
    # naming a word and saw from its BM25 score whether secret/ holds that word too.
    (workspace / "src" / "probe.py").write_text("def probe():\n    return 'zorblax'\n")
    without = tmp_path / "without"
    shutil.copytree(workspace, without)
    (workspace / "secret").mkdir()
    (workspace / "secret" / "keys.py").write_text(
        "def launch_codes():\n    return 'zorblax zorblax'\n\n\ndef more_codes():\n    return 'zorblax'\n"
    )
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    assert "secret/keys.py" in _paths(await search(query="zorblax"))  # indexed by a session that may read it

    denied = await search(denied=("secret/**",), query="zorblax")
    alone = await searcher(_state(embedder, tmp_path / "cache-without"), without)(query="zorblax")
    assert not denied.is_error and "src/probe.py" in _paths(denied), denied.output
    assert (denied.output, denied.metadata) == (alone.output, alone.metadata)


async def test_a_tree_unchanged_since_a_refresh_is_not_listed_again_and_changes_just_before_a_call_are_seen(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    state = _state(embedder, tmp_path / "cache")
    search = searcher(state, workspace)
    index = state.index_for(workspace_root(workspace))
    first = await search(query="wait longer after each unsuccessful attempt")
    assert index.current(()) is not None  # the next call skips the listing and the stats
    assert (await search(query="wait longer after each unsuccessful attempt")).metadata == first.metadata

    # Each change right before a call, with nothing in between: the call must see it.
    with (workspace / "src" / "retry.py").open("a") as handle:
        handle.write('\n\ndef jittered_delay(attempt):\n    """Randomise the backoff delay."""\n    return attempt\n')
    assert "jittered_delay" in {hit["symbol"] for hit in (await search(query="jittered delay")).metadata["results"]}
    (workspace / "src" / "net" / "deep").mkdir(parents=True)
    (workspace / "src" / "net" / "deep" / "socket_pool.py").write_text("def reuse_sockets():\n    return True\n")
    assert "src/net/deep/socket_pool.py" in _paths(await search(query="reuse sockets"))
    (workspace / "src" / "config.py").unlink()
    assert "src/config.py" not in _paths(await search(query="read the YAML settings file", limit=50))
    (workspace / ".gitignore").write_text("src/net/\n")
    assert "src/net/deep/socket_pool.py" not in _paths(await search(query="reuse sockets", limit=50))


async def test_changes_in_hidden_directories_an_ignore_file_lets_in_are_seen(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # rg lists hidden files an ignore file whitelists ("!.github/"), but the watch leaves hidden
    # directories out: a call after a complete refresh took the tree as unchanged, and kept
    # showing a deleted file, and an edited one at its old lines.
    (workspace / ".ignore").write_text("!.github/\n")
    scripts = workspace / ".github" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "deploy.py").write_text('def publish_release():\n    """Upload the release artifacts."""\n')
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    assert ".github/scripts/deploy.py" in _paths(await search(query="upload the release artifacts"))

    (scripts / "deploy.py").write_text(
        '\n\ndef publish_release():\n    """Upload the release artifacts."""\n\n\n'
        'def rollback_release():\n    """Revert the deployment to the previous version."""\n'
    )
    edited = (await search(query="revert the deployment to the previous version")).metadata["results"]
    assert {(hit["symbol"], hit["start_line"]) for hit in edited if hit["path"] == ".github/scripts/deploy.py"} == {
        ("publish_release", 3), ("rollback_release", 7)
    }
    (scripts / "deploy.py").unlink()
    assert ".github/scripts/deploy.py" not in _paths(await search(query="upload the release artifacts", limit=50))


async def test_a_session_with_other_denied_paths_lists_the_tree_again(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)

    # The first session's listing leaves retry.py out of the index; the second may read it.
    assert "src/retry.py" not in _paths(await search(denied=("src/retry.py",), query="compute backoff", limit=50))
    assert "src/retry.py" in _paths(await search(query="compute backoff"))


async def test_a_session_that_denies_a_file_neither_reads_it_nor_takes_it_from_the_others(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # Sessions share the tree's index. The refresh of one that denies retry.py took it out, so a
    # session that may read it, refreshed just before, searched an index without it.
    from tool_worker.tools.search import query_terms

    state = _state(embedder, tmp_path / "cache")
    search = searcher(state, workspace)
    assert "src/retry.py" in _paths(await search(query="compute backoff"))
    with (workspace / "src" / "retry.py").open("a") as handle:
        handle.write('\n\ndef jittered_delay(attempt):\n    """Randomise the backoff delay."""\n    return attempt\n')
    built = embedder.documents

    denied = await search(denied=("src/retry.py",), query="compute backoff", limit=50)
    assert not denied.is_error, denied.output
    assert "src/retry.py" not in _paths(denied)
    assert embedder.documents == built  # its new function was not read for the session that denies it

    # The other session's search, its own refresh done before the denying one's.
    index = state.index_for(workspace_root(workspace))
    query = "wait longer after each unsuccessful attempt"
    outcome = index.search(embedder.encode_query(query), query_terms(query), 10)
    assert ("src/retry.py", "compute_backoff") in {(hit.chunk.path, hit.chunk.symbol) for hit in outcome.hits}
    # Its next call reads the change.
    assert "jittered_delay" in {hit["symbol"] for hit in (await search(query="jittered delay")).metadata["results"]}


async def test_a_file_name_that_is_not_utf8_is_indexed_and_kept_out_of_the_stat_cache(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # SQLite holds text as UTF-8: recording this name in the stat cache raised UnicodeEncodeError,
    # and every call on the workspace failed INTERNAL.
    named = workspace / "src" / os.fsdecode(b"caf\xe9.py")
    named.write_bytes(b'def brew_espresso():\n    """Pull a shot of coffee."""\n')
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    result = await search(query="make coffee")
    assert not result.is_error, result.output
    assert _paths(result)[0] == "src/caf\udce9.py"
    named.unlink()
    gone = await search(query="make coffee")
    assert not gone.is_error, gone.output
    assert "src/caf\udce9.py" not in _paths(gone)
    # After a restart the file is read again, whatever the cache holds.
    restarted = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="retry")
    assert not restarted.is_error, restarted.output


async def test_a_query_with_a_lone_surrogate_is_searched(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # JSON may carry "\ud800", which the model's tokenizer refused with a TypeError (INTERNAL).
    result = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="wait after a failed \ud800 attempt")
    assert not result.is_error, result.output
    assert _paths(result)[0] == "src/retry.py"


# A process that returns from its main while the builder thread is inside the model.
_LEAVES_MID_BUILD = """
import asyncio, json, sys, threading
from pathlib import Path
from tool_worker.registry import ToolRegistry
from tool_worker.semantic.embedder import detect_device, load_embedder
from tool_worker.semantic.tool import SemanticSearch

inner = load_embedder(detect_device())
in_model = threading.Event()

class Signalling:
    model_id, dimensions = inner.model_id, inner.dimensions

    def encode_documents(self, texts):
        in_model.set()
        return inner.encode_documents(texts)

    def encode_query(self, query):
        return inner.encode_query(query)

state = SemanticSearch(Signalling(), Path(sys.argv[2]), embed_wait=0.0)
registry = ToolRegistry([state.tool()])
result = asyncio.run(registry.execute("semantic_search", Path(sys.argv[1]), json.dumps({"query": "request"})))
assert not result.is_error, result.output
in_model.wait()
"""


def test_a_process_that_exits_while_the_index_is_being_built_exits_cleanly(real_embedder: Any, tmp_path: Path) -> None:
    # The builder thread, a daemon, was inside torch when the interpreter finalized: the process
    # aborted (SIGABRT, "terminate called without an active exception"), so a worker drained
    # (SIGTERM) during a build never exited 0.
    import subprocess
    import sys

    workspace = tmp_path / "ws"
    workspace.mkdir()
    for number in range(60):
        (workspace / f"m{number}.py").write_text("".join(
            f'def handler_{number}_{j}(value):\n    """Handle request kind {j} of module {number}."""\n'
            f"    return value * {j} + {number}\n\n"
            for j in range(4)
        ))
    child = subprocess.run(
        [sys.executable, "-c", _LEAVES_MID_BUILD, str(workspace), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]


def test_a_worker_whose_index_cache_is_not_a_database_moves_it_aside_and_offers_the_tool(
    real_embedder: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A foreign or corrupt file where the store's database goes made `load_tools` raise
    # sqlite3.DatabaseError ("file is not a database", no file named), and the worker did not
    # start; then it started without the tool until an operator moved the file. It is a cache.
    from tool_worker.plugins import ToolHost
    from tool_worker.semantic import CACHE_SUBDIRECTORY, load_tools
    from tool_worker.semantic.store import SCHEMA_VERSION

    path = tmp_path / CACHE_SUBDIRECTORY / f"{real_embedder.model_id}-v{SCHEMA_VERSION}.sqlite3"
    path.parent.mkdir()
    path.write_bytes(b"not a database " * 1000)
    with caplog.at_level("WARNING", logger="codelane.semantic"):
        assert [tool.spec.name for tool in load_tools(ToolHost(cache_dir=tmp_path))] == ["semantic_search"]
    [aside] = path.parent.glob(f"{path.name}.corrupt-*")
    assert aside.read_bytes() == b"not a database " * 1000  # kept for a post-mortem
    assert f"cache {path} is corrupt (file is not a database): moved aside to {aside.name}" in caplog.text


def test_a_worker_whose_index_cache_cannot_be_opened_says_so_and_starts_without_the_tool(
    real_embedder: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Not corrupt but unusable (here a directory where the file goes): not the worker's to move.
    from tool_worker.plugins import ToolHost
    from tool_worker.semantic import CACHE_SUBDIRECTORY, load_tools
    from tool_worker.semantic.store import SCHEMA_VERSION

    path = tmp_path / CACHE_SUBDIRECTORY / f"{real_embedder.model_id}-v{SCHEMA_VERSION}.sqlite3"
    path.mkdir(parents=True)
    with caplog.at_level("WARNING", logger="codelane.semantic"):
        assert load_tools(ToolHost(cache_dir=tmp_path)) == []
    assert f"cache in {path.parent} cannot be used (OperationalError: unable to open database file)" in caplog.text
    assert path.is_dir()


def test_a_worker_without_the_grammars_says_so_and_starts_without_the_tool(
    real_embedder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Chunking imports the grammars only when it first cuts a file: a worker with the model but
    # without tree-sitter-language-pack offered the tool, and every call failed INTERNAL
    # (ModuleNotFoundError) instead of the worker saying at start why it is not offered.
    from tool_worker.plugins import ToolHost
    from tool_worker.semantic import load_tools

    monkeypatch.setitem(sys.modules, "tree_sitter_language_pack", None)  # its import fails
    with caplog.at_level("WARNING", logger="codelane.semantic"):
        assert load_tools(ToolHost(cache_dir=tmp_path)) == []
    assert ("semantic_search is not offered: tree_sitter_language_pack is not installed: "
            "pip install -e '.[semantic]'") in caplog.text


async def test_an_index_cache_found_corrupt_while_in_use_is_moved_aside_and_rebuilt(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite reported the damage ("database disk image is malformed") at the first read of the
    # damaged table, as INTERNAL, and then at every call, until an operator moved the file.
    cache = tmp_path / "cache"
    first = _state(embedder, cache)
    await searcher(first, workspace)(query="settings")
    built = embedder.documents
    first.store.close()  # its journal is folded into the file
    _damage_table(first.store.path, "chunks")  # the stats at start are fine: the chunks are not
    restarted = _state(embedder, cache)
    with caplog.at_level("ERROR", logger="codelane.semantic"):
        result = await searcher(restarted, workspace)(query="wait longer after each unsuccessful attempt")
    assert not result.is_error, result.output
    assert _paths(result)[0] == "src/retry.py"
    assert "is corrupt (database disk image is malformed): moved aside" in caplog.text
    assert len(list(cache.glob("*.corrupt-*"))) == 1
    assert embedder.documents == 2 * built  # everything embedded again, once
    again = await searcher(restarted, workspace)(query="settings file")
    assert not again.is_error and embedder.documents == 2 * built


def test_stored_vectors_of_another_length_are_indexed_again_not_ranked(tmp_path: Path) -> None:
    # A vector of the wrong length (a damaged row, a model changed under its name) made every
    # search of the workspace fail in the matrix product, as INTERNAL.
    np = pytest.importorskip("numpy", reason=EXTRA_MISSING)
    from tool_worker.semantic.store import ChunkStore, StoredChunk

    store = ChunkStore(tmp_path, "model", 4)
    chunk = StoredChunk(1, 2, "f", "function", "key", {"f": 1}, np.ones(4, np.float32))
    store.put("d1", [chunk])
    assert store.chunks("d1") is not None
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE chunks SET vector = zeroblob(6)")
    assert store.chunks("d1") is None


async def test_rows_damaged_on_disk_are_indexed_again_not_failed_on(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # SQLite keeps no checksums: bytes flipped inside a row (text no longer UTF-8) raised
    # "Could not decode to UTF-8 column" on reading it, and every call on the workspace failed
    # INTERNAL for good, where the store, a cache, should index the content again.
    state = _state(embedder, tmp_path / "cache")
    first = await searcher(state, workspace)(query="read the YAML settings file")
    assert not first.is_error, first.output
    with sqlite3.connect(state.store.path) as db:
        db.execute("UPDATE chunks SET terms = CAST(X'7bff22' AS TEXT)")
        db.execute("UPDATE stats SET digest = CAST(X'ff' AS TEXT) WHERE path = 'src/config.py'")
        db.execute("UPDATE stats SET path = CAST(X'73ff' AS TEXT) WHERE path = 'src/retry.py'")
    restarted = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="read the YAML settings file")
    assert not restarted.is_error, restarted.output
    assert restarted.metadata["results"] == first.metadata["results"]
    assert restarted.metadata["embedded"] == restarted.metadata["chunks"]


def test_a_corruption_two_threads_report_moves_one_file_aside_not_the_fresh_one(tmp_path: Path) -> None:
    # The builder thread and a call's thread can both meet the damage on the same connection:
    # the second report must not take the file the first one started for a corrupt one.
    pytest.importorskip("numpy", reason=EXTRA_MISSING)
    from tool_worker.semantic.store import ChunkStore

    store = ChunkStore(tmp_path, "model", 4)
    damaged = store._db
    report = sqlite3.DatabaseError("database disk image is malformed")
    store._start_afresh(report, damaged)
    fresh = store._db
    store._start_afresh(report, damaged)  # the other thread, a moment later
    assert store._db is fresh
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1 and store.path.exists()


def _damage_table(path: Path, table: str) -> None:
    """Overwrites the root page of `table` in the SQLite file at `path` with garbage."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)


async def test_a_result_whose_file_became_a_link_or_a_fifo_shows_no_lines_of_it(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A result shows its file's first lines as the file is now. A file the refresh did not reach
    # (its time budget ran out) keeps its chunks; if a symlink took its place, the lines shown
    # were those of the link's target, outside the workspace; if a FIFO did, the call hung for ever.
    from tool_worker.semantic import tool

    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    assert "src/retry.py" in _paths(await search(query="wait longer after each unsuccessful attempt"))
    secret = tmp_path / "secret.py"
    secret.write_text("\n" * 4 + "def compute_backoff(attempt):  TOP-SECRET-TOKEN\n")
    (workspace / "src" / "retry.py").unlink()
    (workspace / "src" / "retry.py").symlink_to(secret)
    (workspace / "src" / "config.py").unlink()
    os.mkfifo(workspace / "src" / "config.py")
    monkeypatch.setattr(tool, "REFRESH_SECONDS", 0.0)  # this call's refresh reaches no file
    result = await asyncio.wait_for(search(query="wait longer after each unsuccessful attempt", limit=50), 60)
    assert not result.is_error, result.output
    assert "src/retry.py" in _paths(result) and "src/config.py" in _paths(result)
    assert "TOP-SECRET" not in result.output


async def test_one_content_chunked_two_ways_by_two_suffixes_is_embedded_whole_in_both(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # The same bytes as one Python function (one chunk) and as text (windows of lines, three
    # here), both new in one refresh: the builder installed the Python chunks' vectors into the
    # text file's slots by position, failed on the count, and two of the text file's chunks
    # never got vectors: every call said the index was still being built, for good. (One content
    # is chunked once whatever its path: the copy read last takes the stored chunks.)
    body = "".join(f"    step_{number} = prepare_the_coffee_beans({number})\n" for number in range(100))
    code = f'def brew_espresso():\n    """Pull a shot of coffee."""\n{body}'
    (workspace / "brew.py").write_text(code)
    (workspace / "brew.txt").write_text(code)
    search = searcher(_state(embedder, tmp_path / "cache"), workspace)
    first = await search(query="make coffee", limit=50)
    again = await search(query="make coffee", limit=50)
    for result in (first, again):
        assert not result.is_error, result.output
        assert result.metadata["embedded"] == result.metadata["chunks"], result.output
        assert "still being built" not in result.output
    assert {"brew.py", "brew.txt"} <= set(_paths(again))


async def test_the_content_of_a_workspace_deleted_whole_leaves_the_disk_later_too(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # Content is released when a refresh of its workspace no longer finds it; a workspace that
    # is gone (a session's temporary directory, a synced copy dropped) is never refreshed again,
    # so its stat rows and every content they name stayed in the cache for good.
    cache = tmp_path / "cache"
    state = _state(embedder, cache)
    await searcher(state, workspace)(query="settings")
    digest = state.index_for(workspace_root(workspace))._files["src/config.py"].digest
    shutil.rmtree(workspace)
    restarted = _state(embedder, cache)
    assert restarted.store.chunks(digest) is not None  # kept a while, as any released content
    assert restarted.store.purge(released_before_ns=time.time_ns()) == 3
    assert restarted.store.chunks(digest) is None


async def test_a_workspace_of_tiny_chunks_is_capped_by_its_chunks_too(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1 MiB file of one-line definitions is some 55,000 chunks (about 2.5 KiB of memory each,
    # and one model call per 32): under the cap on bytes, a few such files held gigabytes and
    # kept the builder busy for hours. The index stops at MAX_INDEXED_CHUNKS as it does at
    # MAX_INDEXED_BYTES, and says so.
    from tool_worker.semantic import index

    monkeypatch.setattr(index, "MAX_INDEXED_CHUNKS", 1)
    result = await searcher(_state(embedder, tmp_path / "cache"), workspace)(query="retry backoff", limit=50)
    assert not result.is_error, result.output
    # By path: docs/guide.md (one chunk), src/config.py (one more: over the cap), nothing after.
    assert set(_paths(result)) <= {"docs/guide.md", "src/config.py"}
    assert result.metadata["chunks"] == 2
    assert "chunks: only the first files by path are indexed" in result.output


async def test_asking_whether_the_index_is_current_never_waits_for_a_search_under_way(
    embedder: CountingEmbedder, workspace: Path, tmp_path: Path
) -> None:
    # `current` runs on the worker's event loop. It took the index's lock, which a search holds on
    # its thread for as long as its matrix product and BM25 take (hundreds of milliseconds on a
    # large index): every call on the workspace stalled the whole worker meanwhile.
    state = _state(embedder, tmp_path / "cache")
    await searcher(state, workspace)(query="settings")
    index = state.index_for(workspace_root(workspace))
    answers: list[Any] = []
    with index._lock:  # what a search under way on another thread holds
        probe = threading.Thread(target=lambda: answers.append(index.current(())), daemon=True)
        probe.start()
        probe.join(5)
    assert answers and answers[0] is not None, "current() waited for the lock of a search under way"


async def test_dropping_a_workspace_index_never_waits_for_its_watch_being_armed(
    embedder: CountingEmbedder, tmp_path: Path
) -> None:
    # `index_for` runs on the event loop; the ninth workspace drops the least recently searched
    # index, whose watch may be arming on another thread (the first arm walks the whole tree,
    # seconds on a large one): closing it waited for that walk, and stalled the worker meanwhile.
    from tool_worker.semantic.tool import MAX_WORKSPACES

    state = _state(embedder, tmp_path / "cache")
    roots = [tmp_path / f"ws{number}" for number in range(MAX_WORKSPACES + 1)]
    for root in roots:
        root.mkdir()
    oldest = state.index_for(roots[0])
    for root in roots[1:-1]:
        state.index_for(root)
    done = threading.Event()
    with oldest._watch._lock:  # what an arm under way on another thread holds
        probe = threading.Thread(target=lambda: (state.index_for(roots[-1]), done.set()), daemon=True)
        probe.start()
        probe.join(5)
        assert done.is_set(), "index_for waited for the dropped index's watch"
    assert roots[0] not in state._indexes
