"""The semantic_search tool: refresh the workspace's index, embed the query, rank, show.

Refreshing the index and embedding the query run at once on two threads of the tool's own (its
waits must not hold the worker's shared threads); a call waits for new content to be embedded for
at most EMBED_WAIT_SECONDS, then answers with what is ready and says what is not (BM25 still
ranks every chunk that is only waiting for its vector). When the tree did not change since a
complete refresh (the index's watch says so), the call neither lists nor stats it, and runs on
one thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tool_worker.confinement.readonly import ReadOnlyLauncher
from tool_worker.merkle import open_as_named
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.semantic import TOOL_NAME
from tool_worker.semantic.embedder import Embedder
from tool_worker.semantic.index import (
    MAX_INDEXED_BYTES,
    MAX_INDEXED_CHUNKS,
    MAX_INDEXED_FILES,
    RESULTS_PER_FILE,
    Builder,
    Hit,
    RefreshReport,
    SearchOutcome,
    WorkspaceIndex,
)
from tool_worker.semantic.ranking import SEMANTIC_WEIGHT
from tool_worker.semantic.store import ChunkStore
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec, well_formed
from tool_worker.tools.rg import MAX_RG_OUTPUT_BYTES, run_rg
from tool_worker.tools.search import MAX_FILE_BYTES, query_terms

DEFAULT_RESULTS = 10
MAX_RESULTS = 50
MAX_QUERY_CHARS = 2000
# How long a call spends looking at changed files (reading, hashing, chunking), and then waiting for
# new content to be embedded, before it answers from what is ready. The build goes on in the
# background; the session's Query timeout (60 s by default) bounds the whole call.
REFRESH_SECONDS = 20.0
EMBED_WAIT_SECONDS = 20.0
SNIPPET_LINES = 6
MAX_SNIPPET_CHARS = 160
# Workspace indexes kept in memory; the least recently searched goes first (its disk cache stays).
MAX_WORKSPACES = 8
# rg's listing of a workspace is read up to this much (names and NULs); a longer one is cut.
MAX_LISTING_BYTES = MAX_RG_OUTPUT_BYTES
# The tool's own threads, where its calls refresh, embed the query and wait for vectors: as many
# as asyncio's default executor may have at most, so calls queue here only past what a worker's
# slots would run of them on any host.
CALL_THREADS = 32


class SemanticSearch:
    """The tool's state in one worker: the model, the on-disk store, one index per workspace."""

    def __init__(self, embedder: Embedder, cache_dir: Path, *, embed_wait: float = EMBED_WAIT_SECONDS) -> None:
        self.embedder = embedder
        self.embed_wait = embed_wait
        self.store = ChunkStore(cache_dir, embedder.model_id, embedder.dimensions)
        self.builder = Builder(embedder, self.store)
        self._indexes: OrderedDict[Path, WorkspaceIndex] = OrderedDict()
        # A call waits for vectors (up to embed_wait) and refreshes (up to REFRESH_SECONDS) on a
        # thread. On asyncio's default executor, shared by the worker's syncs and its other tools,
        # a few such calls held every thread and the rest of the worker waited behind them.
        self._threads = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="semantic-call")

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """`asyncio.to_thread` on the tool's own threads."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(context.run, function, *args)
        )

    def index_for(self, root: Path) -> WorkspaceIndex:
        index = self._indexes.pop(root, None) or WorkspaceIndex(root, self.store, self.builder)
        self._indexes[root] = index
        while len(self._indexes) > MAX_WORKSPACES:
            # On a thread: this runs on the event loop, and closing waits for an arm under way.
            dropped = self._indexes.popitem(last=False)[1]
            threading.Thread(target=dropped.close, name="semantic-index-close", daemon=True).start()
        return index

    def tool(self) -> Tool:
        """The semantic_search tool over this state."""
        return Tool(
            spec=ToolSpec(
                name=TOOL_NAME,
                description=(
                    "Find code by what it does, in plain words (\"where are failed requests retried with "
                    "backoff\", \"how is the config file validated\"), when you do not know the names to grep "
                    "for. Ranks the workspace's functions, classes, methods and doc sections by meaning "
                    f"(embeddings of {self.embedder.model_id}) and BM25 keywords together, and shows each result's "
                    "file, line range, symbol and first lines, and which signal found it. Use `read` on a result "
                    "to see it whole; use grep for an exact name or pattern. `kind` limits results to code or to "
                    f"docs (Markdown, reStructuredText, text); `path` to a directory or file. Returns "
                    f"{DEFAULT_RESULTS} results by default (limit, up to {MAX_RESULTS}), at most "
                    f"{RESULTS_PER_FILE} per file. Files ignored by .gitignore, hidden, binary or over "
                    f"{MAX_FILE_BYTES // 1024} KiB are not indexed."
                ),
                parameters={
                    "type": "object",
                    "properties": {
                        "query": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_QUERY_CHARS,
                            "description": "What the code you want does, in plain words.",
                        },
                        "path": {
                            "type": "string",
                            "description": "Directory or file to search (default: the workspace).",
                        },
                        "limit": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_RESULTS,
                            "description": f"How many results to return (default {DEFAULT_RESULTS}).",
                        },
                        "kind": {
                            "type": "string",
                            "enum": ["code", "docs"],
                            "description": "Only code, or only documentation (default: both).",
                        },
                    },
                    "required": ["query"],
                    "additionalProperties": False,
                },
                lane=Lane.QUERY,
                idempotent=True,
            ),
            run=self.run,
        )

    async def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        # A lone surrogate (JSON's "\ud800") is not text the model's tokenizer takes.
        query = well_formed(args["query"])
        if not query.strip():
            raise ToolFailure("query is blank: say what to look for", ErrorKind.INVALID_ARGUMENTS)
        shown = args.get("path", ".")
        target = resolve_in_workspace(ctx.workspace, shown)
        ctx.check_readable(target, shown)
        if not target.exists():
            raise ToolFailure(f"no such file or directory: {shown}")
        root = workspace_root(ctx.workspace)
        relative = target.relative_to(root).as_posix()
        within = None if relative == "." else _under(relative)
        # Denied files are never read by this call's refresh, and never among its hits nor in its
        # scores and counts; they stay in the tree's index as another session's refresh left them.
        readable = _readable(ctx) if ctx.denied else None
        kind = args.get("kind")
        docs = None if kind is None else kind == "docs"
        index = self.index_for(root)
        stop = threading.Event()

        limit = args.get("limit", DEFAULT_RESULTS)
        # Which files a listing keeps depends on the session's denied paths.
        listing_key = tuple(ctx.denied_paths)

        async def refreshed() -> RefreshReport:
            generation = await self._in_thread(index.before_listing)
            listing = await workspace_files(root, ctx.sandbox.read_only)
            names, denied = listing.names, set()
            if ctx.denied:
                denied = {name for name in names if ctx.hides(name)}
                names = [name for name in names if name not in denied]
            return await self._in_thread(
                index.refresh, names, time.monotonic() + REFRESH_SECONDS, stop, listing_key, generation, denied,
                listing.cut,
            )

        def answer(query_vector: np.ndarray, report: RefreshReport) -> ToolResult:
            index.wait_embedded(time.monotonic() + self.embed_wait, stop)
            outcome = index.search(query_vector, query_terms(query), limit, within, docs, readable)
            return _render(root, query, outcome, report, limit)

        try:
            current = index.current(listing_key)
            if current is not None:
                # Nothing changed since a complete refresh: no listing, no stats, and one hop to a
                # thread for the whole call (on a busy machine each hop waits for a core).
                return await self._in_thread(lambda: answer(self.embedder.encode_query(query), current))
            # The model reads the query while rg walks the tree and the index looks at what changed.
            query_vector, report = await asyncio.gather(
                self._in_thread(self.embedder.encode_query, query), refreshed()
            )
            return await self._in_thread(answer, query_vector, report)
        finally:
            # A cancelled call must not leave its threads working for nobody.
            stop.set()


class WorkspaceListing(NamedTuple):
    names: list[str]
    # rg's output passed MAX_LISTING_BYTES and was cut: files beyond the names exist unlisted.
    cut: bool


async def workspace_files(root: Path, launcher: ReadOnlyLauncher) -> WorkspaceListing:
    """The files the index covers, relative to `root`: rg's walk, as the `search` tool sees them
    (.gitignore honoured, hidden files left out, symlinks not followed)."""
    listing = await run_rg(["--files", "--null"], root, launcher, max_bytes=MAX_LISTING_BYTES)
    # Never an empty listing: the refresh would drop every file from the index.
    listing.check("listing the workspace")
    names = [name.decode("utf-8", "surrogateescape") for name in listing.stdout.split(b"\0")[:-1]]
    return WorkspaceListing(names, listing.overflowed)


def _readable(ctx: ToolContext) -> Callable[[str], bool]:
    return lambda name: not ctx.hides(name)


def _under(relative: str):
    prefix = relative + "/"
    return lambda name: name == relative or name.startswith(prefix)


def _render(root: Path, query: str, outcome: SearchOutcome, report: RefreshReport, limit: int) -> ToolResult:
    blocks = [_render_hit(rank, root, hit, limit) for rank, hit in enumerate(outcome.hits, start=1)]
    if not blocks:
        blocks = [f"No indexed code matches {query!r}" if outcome.chunks else "Nothing here is indexed yet"]
    notices = []
    if outcome.embedded < outcome.chunks:
        notices.append(
            f"[the index is still being built: {outcome.embedded:,} of {outcome.chunks:,} chunks embedded so far; "
            "the others were ranked by keywords only. The build goes on: ask again for complete results]"
        )
    if report.incomplete:
        notices.append(
            f"[indexing stopped at this call's time budget after {report.files:,} files; later files (by path) "
            "are searched as they were last indexed: their changes, and new files among them, are not seen yet]"
        )
    if report.capped:
        notices.append(
            f"[the workspace is over {MAX_INDEXED_FILES:,} files, {MAX_INDEXED_BYTES // 2**20} MiB or "
            f"{MAX_INDEXED_CHUNKS:,} chunks: only the first files by path are indexed]"
        )
    if report.skipped_large:
        notices.append(f"[{report.skipped_large} files over {MAX_FILE_BYTES // 1024} KiB are not indexed]")
    header = (
        f"{len(outcome.hits)} results for {query!r}, ranked by meaning (embedding similarity) and keywords "
        f"(BM25), weighted {SEMANTIC_WEIGHT:g} to {1 - SEMANTIC_WEIGHT:g}; at most {RESULTS_PER_FILE} per file:"
    )
    text = "\n\n".join([header, *blocks, *(["\n".join(notices)] if notices else [])])
    metadata = {
        "results": [_hit_metadata(hit, limit) for hit in outcome.hits],
        "chunks": outcome.chunks,
        "embedded": outcome.embedded,
    }
    return ToolResult(output=text, truncated=bool(notices), metadata=metadata)


_FOUND_BY = {
    "both": "both signals",
    "semantic": "meaning",
    "keyword": "keywords",
    "combined": "meaning and keywords together",
}


def _render_hit(rank: int, root: Path, hit: Hit, limit: int) -> str:
    chunk, ranking = hit.chunk, hit.ranking
    name = f" {chunk.symbol} ({chunk.kind})" if chunk.symbol else ""
    signals = []
    if ranking.semantic:
        signals.append(f"semantic #{ranking.semantic.rank} (similarity {ranking.semantic.score:.2f})")
    if ranking.keyword:
        signals.append(f"keywords #{ranking.keyword.rank} (BM25 {ranking.keyword.score:.1f})")
    found = _FOUND_BY[ranking.found_by(limit)]
    lines = [f"{rank}. {chunk.path}:{chunk.start_line}-{chunk.end_line}{name}, found by {found}: {', '.join(signals)}"]
    lines += _snippet(root / chunk.path, chunk.start_line, chunk.end_line)
    return "\n".join(lines)


def _snippet(path: Path, start: int, end: int) -> list[str]:
    """The first lines of the chunk, as the file is now: none when the file is no longer a regular
    file at that very path (a symlink or a FIFO took its place since it was indexed)."""
    raw = open_as_named(str(path))
    if raw is None:
        return []
    try:
        with io.BufferedReader(raw) as handle:
            text = handle.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    lines = text.split("\n")[start - 1 : min(end, start + SNIPPET_LINES - 1)]
    shown = [f"  {number:>5}: {line.rstrip()[:MAX_SNIPPET_CHARS]}" for number, line in enumerate(lines, start=start)]
    if end - start + 1 > SNIPPET_LINES:
        shown.append(f"         ... ({end - start + 1 - SNIPPET_LINES} more lines)")
    return shown


def _hit_metadata(hit: Hit, limit: int) -> dict[str, Any]:
    chunk, ranking = hit.chunk, hit.ranking
    return {
        "path": chunk.path,
        "start_line": chunk.start_line,
        "end_line": chunk.end_line,
        "symbol": chunk.symbol,
        "kind": chunk.kind,
        "found_by": ranking.found_by(limit),
        "semantic_rank": ranking.semantic.rank if ranking.semantic else None,
        "keyword_rank": ranking.keyword.rank if ranking.keyword else None,
    }


