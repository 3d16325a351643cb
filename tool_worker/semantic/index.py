"""The index of one workspace, held in memory by the worker and kept current call by call.

Each call refreshes it first: files whose size or modification time changed are read and hashed
(SHA-256); content seen before, here or in any workspace sharing the cache, brings its chunks and
vectors from the `ChunkStore`; new content is chunked at once (so BM25 finds it immediately) and
queued for the `Embedder` on a background thread. A call waits for that queue up to its budget,
then answers from what is embedded and says how much is not; the build goes on after it. A call
on a tree that did not change since a complete refresh skips it: a `TreeWatch` (inotify) proves
that without looking at the files (see `current`).

Chunks live in numbered slots: one row of a vector matrix, one BM25 length and the postings of
its terms. A changed file frees its slots and takes new ones, so an update costs in proportion to
the file, never to the workspace.

The vectors sit in one contiguous float16 matrix, both of a chunk's vectors side by side, and a
query is one matrix-vector product over it: on a CPU the search reads the whole matrix from
memory, and float16 halves what it reads (the store keeps vectors in float16 anyway).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import io
import logging
import os
import sqlite3
import stat as stat_module
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tool_worker.merkle import open_as_named
from tool_worker.semantic.chunking import Chunk, chunk_file, is_doc
from tool_worker.semantic.embedder import MAX_EMBED_CHARS, QUERY_THREADS, Embedder
from tool_worker.semantic.ranking import Fused, bm25_scores, diversify, fuse, top_keyword, top_semantic
from tool_worker.semantic.store import ChunkStore, FileStat, StoredChunk
from tool_worker.semantic.watch import TreeWatch
from tool_worker.tools.files import is_binary
from tool_worker.tools.search import BINARY_SNIFF_BYTES, MAX_FILE_BYTES, PATH_WEIGHT, tokenize

log = logging.getLogger("codelane.semantic")

# Bounds on what one workspace's index holds; past them the first files by path are indexed and
# results say so.
MAX_INDEXED_FILES = 50_000
MAX_INDEXED_BYTES = 512 * 1024 * 1024
# Chunks too: a file of one-line definitions is a chunk every 20 bytes or so (55,000 in 1 MiB,
# each about 2.5 KiB of memory and a share of a model call), where code is one in about 800 bytes
# (a sample of site-packages: 512 MiB of it is some 660,000 chunks).
MAX_INDEXED_CHUNKS = 700_000
# A file changed within this long of being hashed may change again without its size or
# modification time showing it (coarse file-system clocks): it is hashed again next time.
RACY_NS = 2_000_000_000
# Texts per call of the model while building: a query waits for at most one such call.
BUILD_BATCH = 32
# Chunks the builder takes from its queue at a time. Their texts are embedded shortest first, so
# that each call of the model pads its texts to a similar length: texts vary from a few tokens to
# the model's limit, and padding them together cost the model three times the work of the texts
# (a sample of 5,000 files of site-packages). Identical texts are embedded once.
BUILD_POOL = 256
# Texts embedded lately, with their vectors: copies of one text queued in separate batches (the
# builder took the first file before the second was queued) are embedded once all the same. About
# 1.5 KiB of vector each.
RECENT_TEXTS = 4096
# At most this many results come from any one file, so that one long file does not fill the list.
RESULTS_PER_FILE = 3
_INITIAL_SLOTS = 1024
# How long the process's exit waits for the builder's model call under way.
STOP_SECONDS = 30.0


@dataclass(frozen=True)
class ChunkInfo:
    """What a result shows about a chunk."""

    path: str
    start_line: int
    end_line: int
    symbol: str
    kind: str


@dataclass
class _File:
    size: int
    mtime_ns: int
    digest: str
    verified_ns: int
    doc: bool
    slots: list[int] = field(default_factory=list)


@dataclass
class RefreshReport:
    """What one refresh saw and did."""

    files: int = 0
    read: int = 0
    new_contents: int = 0
    skipped_large: int = 0
    skipped_binary: int = 0
    # The workspace has more than MAX_INDEXED_FILES files, MAX_INDEXED_BYTES bytes or
    # MAX_INDEXED_CHUNKS chunks.
    capped: bool = False
    # The refresh ran out of time (or was stopped): later files by path were not looked at.
    incomplete: bool = False


@dataclass(frozen=True)
class Hit:
    chunk: ChunkInfo
    ranking: Fused


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    chunks: int
    embedded: int


@dataclass
class _Pending:
    """A content's chunks, some of them waiting for their vectors (`vector` None)."""

    index: WorkspaceIndex
    path: str
    digest: str
    chunks: list[StoredChunk]
    # What the model reads of each chunk: its code, and its summary (None for an unnamed chunk).
    texts: list[tuple[str, str | None]]

    @property
    def missing(self) -> int:
        return sum(chunk.vector is None for chunk in self.chunks)


def embedding_texts(chunk: Chunk) -> tuple[str, str | None]:
    """What the model reads of a chunk: its code under its kind and name (split into words too),
    and, for a named chunk with documentation, a summary of its name and documentation alone. A
    question in plain words often matches the summary better; code often matches the code. A
    chunk scores the better of the two. A chunk without documentation has no summary: its name
    alone would say nothing its code's text (which starts with that name) does not, and a few
    words of a name can sit close to a question they do not answer."""
    if not chunk.symbol:
        return chunk.text, None
    title = f"{chunk.kind} {chunk.symbol} ({' '.join(tokenize(chunk.symbol))})"
    return f"{title}\n{chunk.text}", f"{title}: {chunk.doc}" if chunk.doc else None


def chunk_key(texts: tuple[str, str | None]) -> str:
    code, summary = texts
    return hashlib.sha256(f"{code}\0{summary or ''}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _Stopped(Exception):
    """The builder is stopping: the batch under way is given up."""


class Builder:
    """One daemon thread that embeds queued contents for every workspace of the process.

    It survives its own exceptions: when a batch fails, its files are logged and forgotten (so
    nobody waits for them), and the next call reads them again and retries.

    It stops at the process's exit, after the model call under way: a daemon thread still inside
    torch when the interpreter finalizes aborts the process (SIGABRT, "terminate called without
    an active exception"), so a worker drained with a build going on never exited 0.
    """

    def __init__(self, embedder: Embedder, store: ChunkStore) -> None:
        self.embedder = embedder
        self.store = store
        self._queue: deque[_Pending] = deque()
        # Only the builder thread touches it.
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="semantic-index-builder", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def enqueue(self, pending: _Pending) -> None:
        with self._ready:
            self._queue.append(pending)
            self._ready.notify()

    def stop(self) -> None:
        """Ends the thread once the model call under way returns; what is queued is left (it is a
        cache: the next process builds it)."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        # Bounded: a model that never returns (a hung accelerator) must not keep the process.
        self._thread.join(STOP_SECONDS)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                # Files are embedded together: the model is far faster on full batches of texts
                # of similar length.
                batch = [self._queue.popleft()]
                texts = batch[0].missing
                while self._queue and texts + self._queue[0].missing <= BUILD_POOL:
                    texts += self._queue[0].missing
                    batch.append(self._queue.popleft())
            try:
                self._embed(batch)
            except _Stopped:
                return
            except Exception:
                log.exception("embedding %s failed; the next call tries again", [p.path for p in batch])
                for pending in batch:
                    pending.index.embedding_failed(pending.digest)

    def _embed(self, batch: list[_Pending]) -> None:
        # A content nobody waits for any more (its file changed again, or another copy of it got
        # its vectors first) is skipped.
        wanted = [pending for pending in batch if pending.index.wants(pending.digest)]
        codes: list[str] = []
        summaries: list[str] = []
        for pending in wanted:
            for chunk, (code, summary) in zip(pending.chunks, pending.texts, strict=True):
                if chunk.vector is None:
                    codes.append(code)
                    if summary is not None:
                        summaries.append(summary)
        vectors = self._encode(codes + summaries)
        code_vectors, summary_vectors = iter(vectors[: len(codes)]), iter(vectors[len(codes) :])
        for pending in wanted:
            stored = [
                chunk if chunk.vector is not None else dataclasses.replace(
                    chunk, vector=next(code_vectors), summary=next(summary_vectors) if summary is not None else None
                )
                for chunk, (_, summary) in zip(pending.chunks, pending.texts, strict=True)
            ]
            _cached(self.store.put, pending.digest, stored)
            pending.index.embedding_done(pending.digest, stored)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """The vectors of `texts`, in order: each distinct text not embedded lately embedded once,
        shortest first, in calls of BUILD_BATCH texts."""
        vectors = np.zeros((len(texts), self.embedder.dimensions), np.float32)
        if not texts:
            return vectors
        recent = self._recent
        distinct = [text for text in dict.fromkeys(texts) if text not in recent]
        # Characters stand in for tokens: the model truncates at MAX_EMBED_CHARS anyway.
        distinct.sort(key=lambda text: len(text[:MAX_EMBED_CHARS]))
        for start in range(0, len(distinct), BUILD_BATCH):
            if self._stopping:
                raise _Stopped
            part = distinct[start : start + BUILD_BATCH]
            recent.update(zip(part, self.embedder.encode_documents(part), strict=True))
        for row, text in enumerate(texts):
            vectors[row] = recent[text]
            recent.move_to_end(text)
        while len(recent) > RECENT_TEXTS:
            recent.popitem(last=False)
        return vectors


class WorkspaceIndex:
    """The index of one workspace (by its real path). Thread-safe."""

    def __init__(self, root: Path, store: ChunkStore, builder: Builder) -> None:
        self.root = root
        # The workspace's key in the store's stat cache, and the root that file names are joined to.
        self._key = self._root_path = str(root)
        self._store = store
        self._builder = builder
        self._dimensions = store.dimensions
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._embedded_changed = threading.Condition(self._lock)
        self._files: dict[str, _File] = {}
        # The stat cache from disk, consulted for files this process has not seen yet (read by
        # the first refresh, off the event loop).
        self._known: dict[str, FileStat] = {}
        self._known_loaded = False
        self._info: list[ChunkInfo | None] = []
        # Per slot, the vector of the chunk's code, then of its summary (a copy of the code's when
        # it has no summary).
        self._vectors = np.zeros((_INITIAL_SLOTS, 2, self._dimensions), dtype=np.float16)
        self._alive = np.zeros(_INITIAL_SLOTS, dtype=bool)
        self._embedded = np.zeros(_INITIAL_SLOTS, dtype=bool)
        self._lengths = np.zeros(_INITIAL_SLOTS, dtype=np.float64)
        self._terms: list[dict[str, int] | None] = []
        self._keys: list[str] = []
        self._postings: dict[str, dict[int, int]] = {}
        self._free: list[int] = []
        # digest -> the slot lists (`_File.slots`) of the files waiting for its vectors: one
        # content may sit at several paths.
        self._waiting: dict[str, list[list[int]]] = {}
        # What proves the index current without listing the tree (see `current`): the watch, the
        # number of the latest listing begun (`before_listing`), and the listing key and report of
        # the last refresh that was complete and of the latest listing (None: not proven).
        self._watch = TreeWatch(self._root_path)
        self._arming = threading.Lock()
        self._generation = 0
        self._proven: tuple[Hashable, RefreshReport] | None = None

    # -- refresh -------------------------------------------------------------------------------

    def current(self, listing: Hashable) -> RefreshReport | None:
        """The last refresh's report (nothing read) when it proves the index current, for file
        names listed and then filtered by `listing` (e.g. the session's denied paths): that refresh
        was complete, its listing began after the watch was armed, and nothing changed since.
        None when the tree must be listed and refreshed. Never waits: cheap on an event loop."""
        # The watch first: `before_listing` forgets proof before it arms the watch, so a change
        # that an arming took from the queue is never mistaken for no change.
        if not self._watch.quiet():
            return None
        # Read without the lock (one attribute, replaced whole): a search holds the lock for as
        # long as its product takes, and this runs on the event loop.
        proven = self._proven
        if proven is None or proven[0] != listing:
            return None
        return dataclasses.replace(proven[1], read=0, new_contents=0)

    def before_listing(self) -> int:
        """Called before the tree is listed for `refresh`: arms the watch (walking the tree the
        first time) and returns the listing's number for `refresh`."""
        with self._arming:
            with self._lock:
                self._proven = None
                self._generation += 1
                generation = self._generation
            self._watch.arm()
        return generation

    def close(self) -> None:
        """Stops watching the tree (the index is being dropped)."""
        self._watch.close()

    def refresh(
        self,
        names: list[str],
        deadline: float,
        stop: threading.Event,
        listing: Hashable = None,
        generation: int | None = None,
        unread: Collection[str] = (),
        cut: bool = False,
    ) -> RefreshReport:
        """Brings the index in line with the workspace's files (`names`, relative to the root).

        `unread` are files listed but not to be read by this refresh (the calling session's
        denied paths): they stay in the index as they are, for the sessions that may read them.
        Dropped, a session's refresh took them out of results another session was about to get.
        `cut` says the listing was cut short: the files it left out exist, so none is dropped,
        and the report says the index is capped (such a tree is far past MAX_INDEXED_FILES).

        Stops early at `deadline` (time.monotonic) or when `stop` is set; the files it did not
        reach keep their old state and are looked at by the next refresh. `generation` is what
        `before_listing` returned before `names` were listed (None: the watch was not armed), and
        `listing` what the names were filtered by: a complete refresh of the latest listing
        proves the index current until the watch sees a change (see `current`).
        """
        report = RefreshReport()
        with self._refreshing:
            if not self._known_loaded:
                self._known, self._known_loaded = self._store.stats(self._key), True
            names = sorted(names)
            report.capped = cut
            if len(names) > MAX_INDEXED_FILES:
                names, report.capped = names[:MAX_INDEXED_FILES], True
            seen: set[str] = set()
            changed: dict[str, FileStat] = {}
            total_bytes = 0
            for name in names:
                if stop.is_set() or time.monotonic() > deadline:
                    report.incomplete = True
                    break
                try:
                    # A string path: joining Path objects cost more than the stat itself.
                    info = os.stat(os.path.join(self._root_path, name), follow_symlinks=False)
                except OSError:
                    continue
                if not stat_module.S_ISREG(info.st_mode):
                    continue
                if info.st_size > MAX_FILE_BYTES:
                    report.skipped_large += 1
                    continue
                if total_bytes + info.st_size > MAX_INDEXED_BYTES or self._chunks_held() > MAX_INDEXED_CHUNKS:
                    report.capped = True
                    break
                total_bytes += info.st_size
                seen.add(name)
                self._refresh_file(name, info, report, changed, seen)
            report.files = len(seen)
            removed = [] if report.incomplete or cut else [
                name for name in {*self._files, *self._known} if name not in seen and name not in unread
            ]
            with self._lock:
                for name in removed:
                    self._drop(name)
            _cached(self._store.update_stats, self._key, changed, removed)
            for name in [*changed, *removed]:
                self._known.pop(name, None)
            # The watch leaves hidden directories and files out, as rg does unless an ignore file
            # lets them in ("!.github/"): a listing holding such a file proves nothing, or its
            # changes went unseen (a deleted file kept among the results).
            watched = not any(_hidden(name) for name in names)
            with self._lock:
                # A refresh of an older listing may have undone what the latest one found.
                latest = generation is not None and generation == self._generation
                proven = latest and watched and not report.incomplete and not cut
                self._proven = (listing, report) if proven else None
        return report

    def _refresh_file(
        self, name: str, info: os.stat_result, report: RefreshReport, changed: dict[str, FileStat], seen: set[str]
    ) -> None:
        current = self._files.get(name)
        if current is not None and _unchanged(current.size, current.mtime_ns, current.verified_ns, info):
            return
        known = self._known.get(name) if current is None else None
        if known is not None and _unchanged(known.size, known.mtime_ns, known.verified_ns, info):
            stored = self._store.chunks(known.digest)
            if stored is not None:
                self._install(name, _File(known.size, known.mtime_ns, known.digest, known.verified_ns, is_doc(name)),
                              stored)
                return
        # The file itself, not a symlink or a FIFO swapped in since the listing and the stat.
        raw = open_as_named(os.path.join(self._root_path, name))
        if raw is None:
            seen.discard(name)
            return
        try:
            with io.BufferedReader(raw) as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError:
            seen.discard(name)
            return
        report.read += 1
        if is_binary(data[:BINARY_SNIFF_BYTES]):
            report.skipped_binary += 1
            seen.discard(name)
            return
        verified = time.time_ns()
        digest = hashlib.sha256(data).hexdigest()
        changed[name] = FileStat(len(data), info.st_mtime_ns, digest, verified)
        entry = _File(len(data), info.st_mtime_ns, digest, verified, is_doc(name))
        if current is not None and current.digest == digest:
            with self._lock:
                current.size, current.mtime_ns, current.verified_ns = entry.size, entry.mtime_ns, verified
            return
        stored = self._store.chunks(digest)
        if stored is not None:
            self._install(name, entry, stored)
            return
        report.new_contents += 1
        chunks = chunk_file(name, data.decode("utf-8", "replace"))
        texts = [embedding_texts(chunk) for chunk in chunks]
        # Chunks the file's previous version had (same code, same summary) keep their vectors: an
        # edit costs the model only the chunks it changed.
        previous = self._vectors_by_key(current, known)
        pending = _Pending(self, name, digest, [], texts)
        for chunk, chunk_texts in zip(chunks, texts, strict=True):
            key = chunk_key(chunk_texts)
            vector, summary = previous.get(key, (None, None))
            pending.chunks.append(StoredChunk(
                chunk.start_line, chunk.end_line, chunk.symbol, chunk.kind, key,
                dict(Counter(tokenize(chunk.text))), vector, summary if chunk_texts[1] is not None else None,
            ))
        if pending.missing:
            self._install(name, entry, pending.chunks)
            self._builder.enqueue(pending)
        else:
            _cached(self._store.put, digest, pending.chunks)
            self._install(name, entry, pending.chunks)

    def _vectors_by_key(
        self, entry: _File | None, known: FileStat | None
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """The vectors of a file's previous version: in memory, or on disk after a restart."""
        if entry is None:
            stored = self._store.chunks(known.digest) if known is not None else None
            return {chunk.key: (chunk.vector, chunk.summary) for chunk in stored or [] if chunk.vector is not None}
        with self._lock:
            return {
                self._keys[slot]: (self._vectors[slot, 0].astype(np.float32), self._vectors[slot, 1].astype(np.float32))
                for slot in entry.slots
                if self._embedded[slot]
            }

    def _install(self, name: str, entry: _File, chunks: list[StoredChunk]) -> None:
        path_terms = Counter(tokenize(name))
        with self._lock:
            self._drop(name)
            for chunk in chunks:
                slot = self._take_slot()
                entry.slots.append(slot)
                self._info[slot] = ChunkInfo(name, chunk.start_line, chunk.end_line, chunk.symbol, chunk.kind)
                self._keys[slot] = chunk.key
                # The path's words count in every chunk of the file, as in the `search` tool.
                terms = Counter(chunk.terms)
                for term, count in path_terms.items():
                    terms[term] += PATH_WEIGHT * count
                self._terms[slot] = terms
                for term, count in terms.items():
                    self._postings.setdefault(term, {})[slot] = count
                self._lengths[slot] = sum(terms.values())
                self._alive[slot] = True
                if chunk.vector is not None:
                    self._set_vectors(slot, chunk)
            if any(chunk.vector is None for chunk in chunks):
                self._waiting.setdefault(entry.digest, []).append(entry.slots)
            self._files[name] = entry

    def _drop(self, name: str) -> None:
        """Frees a file's slots. Caller holds the lock."""
        entry = self._files.pop(name, None)
        if entry is None:
            return
        for slot in entry.slots:
            for term in self._terms[slot] or ():
                posting = self._postings[term]
                del posting[slot]
                if not posting:
                    del self._postings[term]
            self._terms[slot] = None
            self._info[slot] = None
            self._alive[slot] = self._embedded[slot] = False
            self._free.append(slot)
        waiting = self._waiting.get(entry.digest)
        if waiting is not None:
            waiting[:] = [slots for slots in waiting if slots is not entry.slots]
            if not waiting:
                del self._waiting[entry.digest]
                self._embedded_changed.notify_all()

    def _chunks_held(self) -> int:
        """The chunks in the index now (files not refreshed yet keep theirs)."""
        with self._lock:
            return len(self._info) - len(self._free)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._info)
        if slot == len(self._alive):
            self._vectors, self._alive, self._embedded, self._lengths = (
                _doubled(array) for array in (self._vectors, self._alive, self._embedded, self._lengths)
            )
        self._info.append(None)
        self._terms.append(None)
        self._keys.append("")
        return slot

    # -- the builder's side --------------------------------------------------------------------

    def wants(self, digest: str) -> bool:
        """Whether a content is still waiting for vectors here (the file may have changed since)."""
        with self._lock:
            return digest in self._waiting

    def embedding_done(self, digest: str, chunks: list[StoredChunk]) -> None:
        """Installs a content's vectors and wakes the waiters."""
        with self._lock:
            for slots in self._waiting.pop(digest, []):
                if [self._keys[slot] for slot in slots] != [chunk.key for chunk in chunks]:
                    # The same bytes cut otherwise (a .py and a .txt copy, both queued with chunks of
                    # their own): the file is read again, and takes the stored chunks.
                    self._reread([name for name, entry in self._files.items() if entry.slots is slots])
                    continue
                for slot, chunk in zip(slots, chunks, strict=True):
                    self._set_vectors(slot, chunk)
            self._embedded_changed.notify_all()

    def _set_vectors(self, slot: int, chunk: StoredChunk) -> None:
        """Caller holds the lock."""
        self._vectors[slot, 0] = chunk.vector
        self._vectors[slot, 1] = chunk.summary if chunk.summary is not None else chunk.vector
        self._embedded[slot] = True

    def embedding_failed(self, digest: str) -> None:
        """Forgets the files of a content that could not be embedded (or stored), so that the next
        refresh reads them again and retries, and wakes the waiters."""
        with self._lock:
            if self._waiting.pop(digest, None) is not None:
                self._reread([name for name, entry in self._files.items() if entry.digest == digest])
            self._embedded_changed.notify_all()

    def _reread(self, names: list[str]) -> None:
        """Drops files so that the next refresh reads them again. Caller holds the lock."""
        for name in names:
            self._drop(name)
            self._known.pop(name, None)
        # The files dropped must be read again: no refresh under way may prove the index.
        self._proven = None
        self._generation += 1

    def wait_embedded(self, deadline: float, stop: threading.Event) -> bool:
        """Waits until nothing waits for vectors, `deadline` passes or `stop` is set; True if done."""
        with self._lock:
            while self._waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stop.is_set():
                    return False
                # Woken by every content embedded; the bounded wait also notices `stop`.
                self._embedded_changed.wait(min(remaining, 0.25))
            return True

    def chunk_count(self) -> int:
        with self._lock:
            return int(self._alive.sum())

    def embedded_count(self) -> int:
        """How many of the chunks have their vectors."""
        with self._lock:
            return int((self._alive & self._embedded).sum())

    # -- search --------------------------------------------------------------------------------

    def search(
        self,
        query_vector: np.ndarray,
        terms: frozenset[str],
        limit: int,
        within: Callable[[str], bool] | None = None,
        docs: bool | None = None,
        readable: Callable[[str], bool] | None = None,
    ) -> SearchOutcome:
        """The best `limit` chunks for a query, among files `within` accepts of the kind asked
        (docs True/False, None for both). Files `readable` refuses (a session's denied paths) are
        left out of the collection too: BM25's document frequencies and average length, and the
        counts, over chunks that include them told the session which words its denied files hold."""
        with self._lock:
            used = len(self._info)
            alive = self._alive[:used]
            if readable is not None:
                alive = np.zeros(used, dtype=bool)
                for name, entry in self._files.items():
                    if readable(name):
                        alive[entry.slots] = True
            if within is None and docs is None:
                eligible = alive.copy()
            else:
                eligible = np.zeros(used, dtype=bool)
                for name, entry in self._files.items():
                    if (docs is None or entry.doc == docs) and (within is None or within(name)):
                        eligible[entry.slots] = True
                eligible &= alive
            embedded = self._embedded[:used]
            similarities = _best_similarities(self._vectors[:used], query_vector)
            semantic = top_semantic(similarities, eligible & embedded)
            keyword = top_keyword(bm25_scores(terms, self._postings, self._lengths[:used], alive), eligible)
            info = self._info
            fused = fuse(semantic, keyword, without_vector=lambda slot: not embedded[slot])
            chosen = diversify(fused, lambda slot: info[slot].path, RESULTS_PER_FILE, limit)
            hits = [Hit(self._info[hit.slot], hit) for hit in chosen]
            return SearchOutcome(hits, int(alive.sum()), int((alive & embedded).sum()))


def _best_similarities(vectors: np.ndarray, query_vector: np.ndarray) -> np.ndarray:
    """Each slot's better cosine similarity to the query, of its two unit vectors (float32).

    torch multiplies float16 on the CPU at memory speed (numpy has no float16 BLAS). One thread
    does: the product is bound by memory, and threads that wait for a busy core cost far more
    than they save (torch's thread count is the calling thread's own)."""
    slots, pair, dimensions = vectors.shape
    torch.set_num_threads(QUERY_THREADS)
    with torch.inference_mode():
        matrix = torch.from_numpy(vectors.reshape(slots * pair, dimensions))
        products = matrix @ torch.from_numpy(query_vector.astype(np.float16))
        return products.view(slots, pair).amax(dim=1).float().numpy()


def _cached(write: Callable[..., None], *args: object) -> None:
    """A write to the store, which is a cache: one it cannot take (its disk full, the file
    read-only) costs a rebuild after a restart, and is logged; the index in memory keeps what it
    has. Raised, it failed the call, and the builder forgot every file it had just embedded, so
    the next call answered "Nothing here is indexed yet" and embedded them all again."""
    try:
        write(*args)
    except sqlite3.Error as exc:
        # Said once until a write succeeds again: every file's vectors fail alike.
        if not _CACHE_FAILING.is_set():
            _CACHE_FAILING.set()
            log.warning("the semantic index's cache could not be written (%s: %s): the index is kept in memory "
                        "only, and is built again after a restart", type(exc).__name__, exc)
        return
    _CACHE_FAILING.clear()


_CACHE_FAILING = threading.Event()


def _doubled(array: np.ndarray) -> np.ndarray:
    grown = np.zeros((2 * len(array), *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _hidden(name: str) -> bool:
    """Whether a listed file, or a directory it is in, is hidden (its name starts with a dot)."""
    return name.startswith(".") or "/." in name


def _unchanged(size: int, mtime_ns: int, verified_ns: int, info: os.stat_result) -> bool:
    # The status change time too: cp -p, tar, rsync -a and a worker's synced copy write new
    # content under the old modification time, but none can set the change time back, and a
    # change after the content was hashed is a change to look at.
    return (
        size == info.st_size
        and mtime_ns == info.st_mtime_ns
        and mtime_ns + RACY_NS < verified_ns
        and info.st_ctime_ns + RACY_NS < verified_ns
    )
