"""The on-disk half of the index: chunks and their vectors by file content, and a stat cache.

One SQLite file per model under `<cache-dir>/semantic/`. Chunks are keyed by the SHA-256 of the
file's content, so a file is chunked and embedded once whatever its path, workspace or session:
sessions on one workspace, copies of it, and content-addressed snapshots all share the entries.
The stat cache (workspace, path -> size, mtime, digest) spares re-reading unchanged files after
a restart. Content that no workspace has any more is kept for a week (an undo or a branch switch
back costs nothing), then deleted. The file is a cache, so a corrupt one (a disk fault, a crash of
the machine mid-write, a foreign file in its place) is moved aside and started afresh, at start or
whenever SQLite reports it, and the index rebuilds what calls need: otherwise every search
failed until an operator moved it by hand. Several worker processes may share one cache
directory: SQLite's WAL mode and a busy timeout serialise their writes, and an entry written
twice is the same entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("codelane.semantic")

# Bump when chunking or the stored layout changes: a new file is started, the old one left alone.
SCHEMA_VERSION = 3
# Content no workspace has any more is kept this long, so that an undo or a branch switch back
# finds its vectors, then deleted.
RELEASED_RETENTION_NS = 7 * 24 * 3600 * 10**9
BUSY_TIMEOUT_MS = 30_000
# How often the store looks for workspaces that are gone (and content nothing names).
SWEEP_INTERVAL_NS = 3600 * 10**9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contents (
    digest TEXT PRIMARY KEY,          -- SHA-256 of the file's bytes, hex
    chunk_count INTEGER NOT NULL,
    released_ns INTEGER               -- since when no workspace's file has this content (NULL: one has)
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL,
    symbol TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,                -- digest of what the model read (see index.chunk_key)
    terms TEXT NOT NULL,              -- JSON {term: count} for BM25
    vector BLOB NOT NULL,             -- float16, the model's dimensions: of the chunk's code
    summary BLOB,                     -- float16: of its name and documentation (NULL: no name or no docs)
    PRIMARY KEY (digest, ordinal)
);
CREATE TABLE IF NOT EXISTS stats (
    workspace TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest TEXT NOT NULL,
    verified_ns INTEGER NOT NULL,     -- when the content was last hashed
    PRIMARY KEY (workspace, path)
);
CREATE INDEX IF NOT EXISTS stats_by_digest ON stats (digest);
"""


@dataclass(frozen=True)
class StoredChunk:
    start_line: int
    end_line: int
    symbol: str
    kind: str
    # Digest of the texts the model reads of the chunk: a chunk with the same key in a file's
    # next version takes its vectors over instead of being embedded again.
    key: str
    terms: dict[str, int]
    # float32; None while the chunk waits for the model (never stored so).
    vector: np.ndarray | None
    # float32, of the chunk's name and documentation; None for a chunk without a name or documentation.
    summary: np.ndarray | None = None


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    digest: str
    verified_ns: int


def _recovering(method):
    """Runs a store method; when SQLite says the file is corrupt, moves it aside and runs the
    method again on a fresh one (where nothing is stored yet: the index rebuilds it)."""

    @functools.wraps(method)
    def run(self: ChunkStore, *args, **kwargs):
        failed = self._db
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                raise
            self._start_afresh(exc, failed)
            return method(self, *args, **kwargs)

    return run


class ChunkStore:
    """Thread-safe (one connection, one lock): the index's threads share it."""

    def __init__(self, directory: Path, model_id: str, dimensions: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{model_id}-v{SCHEMA_VERSION}.sqlite3"
        self.dimensions = dimensions
        self._lock = threading.Lock()
        try:
            self._db, self._inode = self._connect()
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                raise
            self._db, self._inode = None, None
            self._start_afresh(exc, None)
        self._next_sweep_ns = 0
        self._sweep_if_due(time.time_ns())

    def _connect(self) -> tuple[sqlite3.Connection, int]:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
            return db, os.stat(self.path).st_ino
        except BaseException:
            db.close()
            raise

    def _start_afresh(self, exc: sqlite3.DatabaseError, failed: sqlite3.Connection | None) -> None:
        """Moves the corrupt file aside (kept for a post-mortem) and opens a new one, unless
        another thread did since `failed`, the connection that reported it, was current."""
        with self._lock:
            if self._db is not failed:
                return
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            try:
                same_file = os.stat(self.path).st_ino == self._inode or self._inode is None
            except FileNotFoundError:
                same_file = False
            if same_file:  # else another worker sharing the cache directory has done it
                aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, aside)
                    log.error("the semantic index's cache %s is corrupt (%s): moved aside to %s; the index is "
                              "rebuilt as calls need it", self.path, exc, aside.name)
                for suffix in ("-wal", "-shm"):  # the corrupt file's journal: never replayed into the new one
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.path}{suffix}")
            self._db, self._inode = self._connect()

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction, under the lock the caller holds."""
        self._db.execute("BEGIN IMMEDIATE")
        with self._committing():
            yield

    @contextlib.contextmanager
    def _committing(self):
        """Commits the transaction begun, or rolls it back when the block raises."""
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A ROLLBACK failing too (a corrupt file) must not hide why the transaction failed.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @_recovering
    def chunks(self, digest: str) -> list[StoredChunk] | None:
        """The chunks stored for this content, or None when it was never indexed (or what is
        stored cannot be used: it is indexed again)."""
        with self._lock:
            row = self._db.execute("SELECT chunk_count FROM contents WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                return None
            # Text as bytes, decoded below: SQLite keeps no checksums, and a row damaged on disk
            # raised "Could not decode to UTF-8" here, failing every call on its workspace for good.
            rows = self._db.execute(
                "SELECT start_line, end_line, CAST(symbol AS BLOB), CAST(kind AS BLOB), CAST(key AS BLOB), "
                "CAST(terms AS BLOB), vector, summary FROM chunks WHERE digest = ? ORDER BY ordinal",
                (digest,),
            ).fetchall()
        if len(rows) != row[0]:
            return None  # a write that never finished: index it again
        width = 2 * self.dimensions  # float16
        if any(not isinstance(vector, bytes) or len(vector) != width
               or (summary is not None and (not isinstance(summary, bytes) or len(summary) != width))
               for *_, vector, summary in rows):
            return None  # vectors of another length than the model's: not ours to rank with
        try:
            return [_stored_chunk(*row) for row in rows]
        except ValueError:
            return None  # a row damaged on disk: the content is indexed again, and stored afresh

    @_recovering
    def put(self, digest: str, chunks: list[StoredChunk]) -> None:
        """Stores one content's chunks in one transaction (all or nothing)."""
        if any(c.vector is None for c in chunks):
            raise ValueError("every stored chunk needs its vector")
        rows = [
            (digest, ordinal, c.start_line, c.end_line, c.symbol, c.kind, c.key, json.dumps(c.terms),
             c.vector.astype(np.float16).tobytes(),
             c.summary.astype(np.float16).tobytes() if c.summary is not None else None)
            for ordinal, c in enumerate(chunks)
        ]
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
            self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("INSERT OR REPLACE INTO contents VALUES (?, ?, NULL)", (digest, len(rows)))

    @_recovering
    def stats(self, workspace: str) -> dict[str, FileStat]:
        with self._lock:
            # Text as bytes, as in `chunks`: a row damaged on disk is left out (its file is read again).
            rows = self._db.execute(
                "SELECT CAST(path AS BLOB), size, mtime_ns, CAST(digest AS BLOB), verified_ns FROM stats "
                "WHERE workspace = ?",
                (workspace,),
            ).fetchall()
        stats = {}
        for path, size, mtime_ns, digest, verified_ns in rows:
            try:
                if all(isinstance(number, int) for number in (size, mtime_ns, verified_ns)):
                    stats[path.decode()] = FileStat(size, mtime_ns, digest.decode(), verified_ns)
            except UnicodeDecodeError:
                pass
        return stats

    @_recovering
    def update_stats(self, workspace: str, changed: dict[str, FileStat], removed: Iterable[str]) -> None:
        """Records the workspace's new stats; content no workspace has any more is released, and
        content released longer than RELEASED_RETENTION_NS ago deleted."""
        # SQLite holds text as UTF-8: a name that is not (rg's bytes decoded with surrogateescape)
        # is not cached, and its file is read again after a restart.
        changed = {path: stat for path, stat in changed.items() if _storable(path)}
        removed = [path for path in removed if _storable(path)]
        if not changed and not removed:
            return
        now = time.time_ns()
        with self._lock, self._transaction():
            previous = {
                digest
                for (digest,) in self._db.execute(
                    "SELECT digest FROM stats WHERE workspace = ? AND path IN (SELECT value FROM json_each(?))",
                    (workspace, json.dumps([*changed, *removed])),
                )
            }
            self._db.executemany(
                "DELETE FROM stats WHERE workspace = ? AND path = ?", [(workspace, path) for path in removed]
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?, ?)",
                [(workspace, path, s.size, s.mtime_ns, s.digest, s.verified_ns) for path, s in changed.items()],
            )
            current = {s.digest for s in changed.values()}
            self._db.executemany(
                "UPDATE contents SET released_ns = NULL WHERE digest = ?", [(digest,) for digest in current]
            )
            for digest in previous - current:
                if self._db.execute("SELECT 1 FROM stats WHERE digest = ? LIMIT 1", (digest,)).fetchone() is None:
                    self._db.execute("UPDATE contents SET released_ns = ? WHERE digest = ?", (now, digest))
            self._purge(now - RELEASED_RETENTION_NS)
        self._sweep_if_due(now)

    @_recovering
    def _sweep_if_due(self, now: int) -> None:
        """At most every SWEEP_INTERVAL_NS: forgets the stats of workspaces that are gone (no
        refresh will ever release their content), and releases content no stats name any more
        (the same content stored again after its release). Released content goes a week later."""
        if now < self._next_sweep_ns:
            return
        self._next_sweep_ns = now + SWEEP_INTERVAL_NS
        with self._lock:
            workspaces = [row[0] for row in self._db.execute("SELECT DISTINCT workspace FROM stats")]
            gone = [(workspace,) for workspace in workspaces if not os.path.isdir(workspace)]
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return  # another process holds the database longer than the busy timeout: next time
            with self._committing():
                self._db.executemany("DELETE FROM stats WHERE workspace = ?", gone)
                self._db.execute(
                    "UPDATE contents SET released_ns = ? WHERE released_ns IS NULL "
                    "AND NOT EXISTS (SELECT 1 FROM stats WHERE stats.digest = contents.digest)",
                    (now,),
                )

    @_recovering
    def purge(self, released_before_ns: int) -> int:
        """Deletes the content released before this time; returns how many contents went."""
        with self._lock, self._transaction():
            return self._purge(released_before_ns)

    def _purge(self, released_before_ns: int) -> int:
        self._db.execute(
            "DELETE FROM chunks WHERE digest IN (SELECT digest FROM contents WHERE released_ns < ?)",
            (released_before_ns,),
        )
        return self._db.execute("DELETE FROM contents WHERE released_ns < ?", (released_before_ns,)).rowcount


def _stored_chunk(
    start: object, end: object, symbol: bytes, kind: bytes, key: bytes, terms: bytes, vector: bytes,
    summary: bytes | None,
) -> StoredChunk:
    """A row of `chunks`; ValueError when it is not what `put` wrote (damaged on disk)."""
    counts = json.loads(terms.decode())
    if not (isinstance(start, int) and isinstance(end, int) and isinstance(counts, dict)
            and all(isinstance(count, int) for count in counts.values())):
        raise ValueError("not a chunk put wrote")
    return StoredChunk(
        start, end, symbol.decode(), kind.decode(), key.decode(), counts, _vector(vector),
        _vector(summary) if summary is not None else None,
    )


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's own word that the file is damaged or not a database (not busy, full or read-only)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _storable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.float16).astype(np.float32)
