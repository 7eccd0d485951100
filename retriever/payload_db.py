"""The SQLite side of the FAISS store: points (string id, JSON payload), their vectors, and a change counter.

SQLite is the source of truth; the FAISS index is a cache derived from the `vectors` table. Every point has
an integer `fid` (its FAISS id) that is never reused: a point whose vector changes gets a new fid. So an index
entry (fid, vector) is valid exactly while that fid is in SQLite, and an index of any age can be brought up to
date by set differences of fids alone.

Keyword search: the FTS5 table `texts` holds, per fid, the words of the point's paths, tags and captions
(`retriever.keywords.payload_text`, already tokenised) and their number; it changes in the same transactions
as `points`, and `meta` keeps the corpus totals (documents with words, words) that BM25 normalises by.

What every search reads is kept in memory: the generation, read again only after a commit (the WAL-index header
that SQLite rewrites on every commit, through any connection in any process, tells without a query when;
`CommitWatch`, `PayloadDB._snapshot`), and the id and payload of every point (`PayloadDB._mirror_now`), which
after a commit reads only the rows the `changes` log names: triggers on `points` log every row any writer
inserts, updates or deletes. Payloads in memory, as Qdrant keeps them by default: a search's hits then cost no
SQLite read, which after the faiss search has evicted the CPU caches costs as much as 15 µs a hit.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from indexer.errors import InvalidQuery
from retriever.keywords import payload_words
from retriever.store import Filter, Payload, PayloadUpdate, Record, merged_payload

SCHEMA_VERSION = 3  # 2: the `texts` full-text index; 3: `point_paths`. Both are built on open for collections
# made before them, in the one write transaction that an older file needs (`changes` and its triggers likewise, with
# nothing to fill: a copy in memory starts by reading every point)

_SCHEMA_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS points (
    fid INTEGER PRIMARY KEY,   -- the FAISS id
    id TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL      -- JSON; its words are in `texts` under the same fid
)""",
    # Apart from `points` so that filter scans over payloads do not read a 2 KB blob per row.
    """CREATE TABLE IF NOT EXISTS vectors (
    fid INTEGER PRIMARY KEY,
    vector BLOB NOT NULL       -- float32, little-endian, `dim` values
)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('generation', 0), ('next_fid', 0), "
    "('text_documents', 0), ('text_words', 0)",
    # The fids of `points` rows changed by each commit, in commit order: readers' copies in memory and FAISS
    # indexes follow other processes' commits by reading only what changed.
    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, fid INTEGER NOT NULL)",
    """CREATE TRIGGER IF NOT EXISTS points_inserted AFTER INSERT ON points BEGIN
    INSERT INTO changes (fid) VALUES (NEW.fid);
END""",
    """CREATE TRIGGER IF NOT EXISTS points_updated AFTER UPDATE ON points BEGIN
    INSERT INTO changes (fid) SELECT OLD.fid UNION SELECT NEW.fid;
END""",
    """CREATE TRIGGER IF NOT EXISTS points_deleted AFTER DELETE ON points BEGIN
    INSERT INTO changes (fid) VALUES (OLD.fid);
END""",
)

# Every (path, fid) of the `paths` lists of `points`, kept by triggers: finding the image of a path (delete by path,
# the pipeline's look-up of a chunk's files) is an index look-up, not a scan of the collection.
_PATHS_SCHEMA = (
    "CREATE TABLE point_paths (path TEXT NOT NULL, fid INTEGER NOT NULL, PRIMARY KEY (path, fid)) WITHOUT ROWID",
    "CREATE INDEX point_paths_fid ON point_paths (fid)",
    """CREATE TRIGGER paths_inserted AFTER INSERT ON points BEGIN
    INSERT OR IGNORE INTO point_paths (path, fid)
        SELECT value, NEW.fid FROM json_each(NEW.payload, '$.paths') WHERE type = 'text';
END""",
    """CREATE TRIGGER paths_updated AFTER UPDATE OF payload ON points BEGIN
    DELETE FROM point_paths WHERE fid = OLD.fid;
    INSERT OR IGNORE INTO point_paths (path, fid)
        SELECT value, NEW.fid FROM json_each(NEW.payload, '$.paths') WHERE type = 'text';
END""",
    """CREATE TRIGGER paths_deleted AFTER DELETE ON points BEGIN
    DELETE FROM point_paths WHERE fid = OLD.fid;
END""",
)

# The body is pre-tokenised text (words joined by spaces); remove_diacritics 0 keeps FTS5 from folding a word
# that the tokenizer in retriever/keywords.py (and Qdrant's) keeps as it is.
_TEXT_SCHEMA = (
    "CREATE VIRTUAL TABLE texts USING fts5(body, length UNINDEXED, tokenize = 'unicode61 remove_diacritics 0')",
    "CREATE VIRTUAL TABLE texts_vocab USING fts5vocab(texts, row)",  # documents per word, for idf
)

_FLOAT32 = np.dtype("<f4")

# Collections up to this many points keep every id and payload in memory (a few hundred bytes a point);
# larger ones read the hits of each search from SQLite.
MIRROR_MAX_POINTS = 4_000_000
# The change log keeps this many rows: a reader whose copy is older than that reads every point again.
CHANGE_LOG_KEEP = 200_000
FRESH_CACHE_KIB = 32768  # SQLite's page cache for the reads searches make (its default is 2 MiB)


@dataclass(frozen=True)
class VectorChanges:
    """What a write did to the set of (fid, vector) pairs, for the FAISS index to follow."""

    added_fids: np.ndarray  # int64
    added_vectors: np.ndarray  # float32, (len(added_fids), dim)
    removed_fids: np.ndarray  # int64
    generation: int  # the generation this change produced (unchanged when it is empty)
    seq_before: int = 0  # the last row of the change log before this transaction
    seq_after: int = 0  # and after it
    next_fid: int = 0  # `next_fid` after it

    def is_empty(self) -> bool:
        return len(self.added_fids) == 0 and len(self.removed_fids) == 0


@dataclass(frozen=True)
class SyncPoint:
    """Where a reader of the collection stands: the generation, the last change-log row and next_fid."""

    generation: int
    seq: int
    next_fid: int


@dataclass(frozen=True)
class IndexDelta:
    """What the FAISS index must add and remove to follow the commits since a sync point, and the new one."""

    added_fids: np.ndarray  # int64
    added_vectors: np.ndarray  # float32, (len(added_fids), dim)
    removed_fids: np.ndarray  # int64
    now: SyncPoint

    def is_empty(self) -> bool:
        return len(self.added_fids) == 0 and len(self.removed_fids) == 0


_NO_FIDS = np.empty(0, dtype=np.int64)


def _connect(path: Path, lock_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits lock_timeout for a locked file."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=lock_timeout)


def filter_sql(filter: Filter | None) -> tuple[str, list[Any]]:
    """An SQL condition on table `points` that holds exactly when `Filter.matches(payload)` does."""
    if filter is None or filter.is_empty():
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    if filter.path_prefix is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM json_each(points.payload, '$.paths') AS p WHERE substr(p.value, 1, ?) = ?)"
        )
        params += [len(filter.path_prefix), filter.path_prefix]  # substr and len both count code points
    if filter.tags_any:
        clauses.append(
            "EXISTS (SELECT 1 FROM json_each(points.payload, '$.tags') AS t "
            "WHERE t.value IN (SELECT value FROM json_each(?)))"
        )
        params.append(json.dumps(list(filter.tags_any)))
    if filter.tags_all:
        wanted = sorted(set(filter.tags_all))
        clauses.append(
            "(SELECT count(DISTINCT t.value) FROM json_each(points.payload, '$.tags') AS t "
            "WHERE t.value IN (SELECT value FROM json_each(?))) = ?"
        )
        params += [json.dumps(wanted), len(wanted)]
    for key, low, high in (
        ("width", filter.min_width, filter.max_width),
        ("height", filter.min_height, filter.max_height),
        ("bytes", filter.min_bytes, filter.max_bytes),
    ):
        # a missing key or JSON null extracts as NULL; a comparison with NULL is false, as in Filter.matches
        if low is not None:
            clauses.append(f"json_extract(points.payload, '$.{key}') >= ?")
            params.append(low)
        if high is not None:
            clauses.append(f"json_extract(points.payload, '$.{key}') <= ?")
            params.append(high)
    # `taken` strings of one fixed form order as the times they name; a missing or non-text one never matches
    for bound, operator in ((filter.taken_after, ">="), (filter.taken_before, "<=")):
        if bound is not None:
            clauses.append(
                "(json_type(points.payload, '$.taken') = 'text' "
                f"AND json_extract(points.payload, '$.taken') {operator} ?)"
            )
            params.append(bound)
    return " AND ".join(clauses), params


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"payload value {value!r} of type {type(value).__name__} cannot be stored as JSON")


def encode_payload(payload: Payload) -> str:
    """The JSON text stored for a payload (numpy scalars and paths become plain JSON; NaN is refused)."""
    return json.dumps(
        payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
    )


def _as_json_array(values: Sequence[Any] | np.ndarray) -> str:
    # one JSON parameter instead of one SQL variable per value: no limit on the number of values
    if isinstance(values, np.ndarray):
        values = values.tolist()
    return json.dumps(list(values))


class CommitWatch:
    """Tells without a system call whether a transaction may have committed, from SQLite's WAL-index header.

    In WAL mode every connection to a database, in any process, maps its `-shm` file, whose first 48 bytes
    are the WAL-index header (https://www.sqlite.org/walformat.html, "The WAL-Index Header"). Every commit
    rewrites it (`iChange` counts transactions; `mxFrame`, the salts and the checksums move with them), its
    second copy first and this one last, after which new read transactions see the commit. So the same bytes
    as when a value was read from SQLite mean that no transaction has committed since; any difference means
    "read SQLite again". A read, even of one row, is a read transaction: file locks and a stat, which on a
    loaded machine cost as much as the rest of a search's bookkeeping. A header in another format than the
    one described there (version 3007000, initialised) leaves the collection without a watch.

    The map stays valid while the connection is open: SQLite truncates or deletes the `-shm` file only when no
    other connection has it open.

    A process maps each `-shm` file once and never closes that file: closing any descriptor of a file drops
    every POSIX lock the process holds on it, SQLite's among them (its dead-man-switch lock, which tells other
    processes that the shared memory is in use: without it, another process opening the database rebuilds the
    WAL index under this one's feet, and its commits fail with "locking protocol").
    """

    HEADER_BYTES = 48
    FORMAT_VERSION = 3007000

    def __init__(self, view: mmap.mmap) -> None:
        self._view = view

    @classmethod
    def open(cls, path: Path) -> CommitWatch | None:
        """A watch on the `-shm` file at path, or None when there is none or it is not in the known format."""
        with _SHM_LOCK:
            try:
                status = os.stat(path)
                view = _SHM_MAPS.get((status.st_dev, status.st_ino))
                if view is None:
                    if status.st_size < cls.HEADER_BYTES:
                        return None
                    fd = os.open(path, os.O_RDONLY)
                    _SHM_FILES.append(fd)  # never closed (see above)
                    opened = os.fstat(fd)
                    key = (opened.st_dev, opened.st_ino)
                    view = _SHM_MAPS.get(key)
                    if view is None:
                        # the map keeps a descriptor of its own, and is kept for the process's life too
                        view = _SHM_MAPS[key] = mmap.mmap(fd, cls.HEADER_BYTES, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return None
        watch = cls(view)
        header = watch.header()
        if int.from_bytes(header[0:4], sys.byteorder) != cls.FORMAT_VERSION or header[12] != 1:
            return None
        return watch

    def header(self) -> bytes:
        """The header's first copy, the one a commit writes last."""
        return self._view[: self.HEADER_BYTES]

    def close(self) -> None:
        """Nothing to release: the map is the process's, shared by every watch on the file (see above)."""


# (st_dev, st_ino) of a -shm file -> the process's one map of its header; and the descriptors behind them
_SHM_MAPS: dict[tuple[int, int], mmap.mmap] = {}
_SHM_FILES: list[int] = []
_SHM_LOCK = threading.Lock()


class PayloadDB:
    """One collection's SQLite file (WAL mode), safe to share with other processes.

    Three connections: writes (`_write_conn`, one explicit BEGIN IMMEDIATE transaction each, serialised by
    `_write_lock`), reads (`_conn`; the store keeps its catch-up's read transaction apart from other reads), and
    what every search checks (`_fresh_conn`, `_fresh_lock`). Readers never take SQLite's write lock: opening an
    existing, current collection only reads, and WAL readers do not wait for writers.
    """

    def __init__(
        self,
        path: Path,
        dim: int,
        lock_timeout: float = 5.0,
        mirror_max_points: int = MIRROR_MAX_POINTS,
    ) -> None:
        self.path = path
        self.dim = dim
        self.lock_timeout = lock_timeout
        self.mirror_max_points = mirror_max_points
        # autocommit mode: transactions are explicit; `timeout` is SQLite's busy wait for another writer's lock
        self._conn = _connect(path, lock_timeout)
        self._write_conn = _connect(path, lock_timeout)
        self._write_lock = threading.Lock()
        try:
            if not self._schema_is_current():
                self._create_or_upgrade()
        except BaseException:
            self._conn.close()
            self._write_conn.close()
            raise
        # What every search reads, kept while no transaction commits (see `_snapshot`): read through a connection
        # of its own, one statement at a time. A statement on a connection where another thread's statement is
        # still running joins that one's read transaction, and so may miss commits made since it began.
        self._fresh_conn = _connect(path, lock_timeout)
        # Its pages are `points` rows (vectors go through the main connection), read when the collection is too
        # large for the copy in memory: room for all of them in a collection of 200k points with short payloads.
        self._fresh_conn.execute(f"PRAGMA cache_size=-{FRESH_CACHE_KIB}")
        self._fresh_lock = threading.Lock()
        self._snapshot_now: _Snapshot | None = None
        # fid -> (id, payload JSON) of every point, as of the last change applied (None: not read, or too large)
        self._mirror: dict[int, tuple[str, str]] | None = None
        self._mirror_seq = -1  # the last row of `changes` applied to it; -1: never read
        self._mirror_header = b""  # the WAL-index header seen before it was last brought up to date
        self._mirror_excess = 0  # points over the limit when last counted: the deletes it takes to fit
        # a read first: a connection opened before another one switched the file to WAL reports its old mode
        self._conn.execute("SELECT count(*) FROM meta").fetchone()
        wal = self._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # after the first reads: the -shm file exists and is initialised
        self._commits = CommitWatch.open(Path(f"{path}-shm")) if wal else None

    def _schema_is_current(self) -> bool:
        """Whether the file holds this schema version in WAL mode: a read, so opening needs no write lock."""
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return False
            raise
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        return row is not None and int(row[0]) >= SCHEMA_VERSION and mode == "wal"

    def _create_or_upgrade(self) -> None:
        """Create the schema, or bring an older one up to date, in one write transaction (once per file)."""
        conn = self._write_conn
        # Takes effect only on a new file. With 4 KB pages a 2 KB vector row (dim 512) fits once per page,
        # wasting half the file; 16 KB pages hold seven.
        conn.execute("PRAGMA page_size=16384")
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: later connections find it set
        with self._transaction() as conn:
            for statement in _SCHEMA_STATEMENTS:
                conn.execute(statement)
            exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            if not conn.execute(exists, ("texts",)).fetchone():  # collections made before version 2
                for statement in _TEXT_SCHEMA:
                    conn.execute(statement)
                last = -1
                while True:
                    rows = conn.execute(
                        "SELECT fid, payload FROM points WHERE fid > ? ORDER BY fid LIMIT 10000", (last,)
                    ).fetchall()
                    if not rows:
                        break
                    self._index_texts([(fid, json.loads(text)) for fid, text in rows])
                    last = rows[-1][0]
            if not conn.execute(exists, ("point_paths",)).fetchone():  # before version 3
                for statement in _PATHS_SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO point_paths (path, fid) SELECT p.value, points.fid "
                    "FROM points, json_each(points.payload, '$.paths') AS p WHERE p.type = 'text'"
                )
            self._set_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        self._mirror = None
        self._fresh_conn.close()
        self._conn.close()
        self._write_conn.close()
        if self._commits is not None:
            self._commits.close()
            self._commits = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the write connection; the change log is pruned to its last rows in it."""
        with self._write_lock:
            conn = self._write_conn
            conn.execute("BEGIN IMMEDIATE")  # waits up to lock_timeout for another process's write
            try:
                yield conn
                conn.execute(
                    "DELETE FROM changes WHERE seq <= (SELECT seq FROM sqlite_sequence WHERE name = 'changes') - ?",
                    (CHANGE_LOG_KEEP,),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                # after a refused COMMIT (a full disk, an I/O error) SQLite may or may not have rolled back; one
                # left open would hold the write lock against every process and fail this connection's next BEGIN
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Reads inside see one snapshot of the database: commits made meanwhile (by any connection) are not seen.

        For a caller that reads in several statements and needs them to agree (fids, then their vectors); the
        caller keeps other threads off the read connection meanwhile (FaissStore's write lock).
        """
        self._conn.execute("BEGIN")  # deferred: the snapshot is taken by the first read
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _meta(self, key: str, conn: sqlite3.Connection | None = None) -> int:
        """A meta value: by default inside the write transaction (the write connection)."""
        conn = conn or self._write_conn
        return int(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._write_conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _index_texts(self, rows: Sequence[tuple[int, Payload]]) -> None:
        """Add the words of (fid, payload) rows to `texts`; rows without words are left out of the corpus."""
        entries = [(fid, " ".join(words), len(words)) for fid, payload in rows if (words := payload_words(payload))]
        if entries:
            self._write_conn.executemany("INSERT INTO texts (rowid, body, length) VALUES (?, ?, ?)", entries)
            self._add_text_totals(len(entries), sum(length for _, _, length in entries))

    def _unindex_texts(self, fids: Sequence[int]) -> None:
        """Remove the words of fids from `texts` (one statement per fid: FTS5 looks up rowid = ? directly)."""
        conn = self._write_conn
        lengths = [
            row[0]
            for fid in fids
            if (row := conn.execute("SELECT length FROM texts WHERE rowid = ?", (fid,)).fetchone())
        ]
        if lengths:
            conn.executemany("DELETE FROM texts WHERE rowid = ?", [(fid,) for fid in fids])
            self._add_text_totals(-len(lengths), -sum(lengths))

    def _add_text_totals(self, documents: int, words: int) -> None:
        self._set_meta("text_documents", self._meta("text_documents") + documents)
        self._set_meta("text_words", self._meta("text_words") + words)

    def _last_seq(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    @property
    def generation(self) -> int:
        """Bumped by every commit that adds or removes a (fid, vector) pair; payload-only changes leave it."""
        return self._meta("generation", self._conn)

    def _snapshot(self) -> _Snapshot | None:
        """What is known of the database as it is now, read again only after a commit; None without a watch.

        The WAL-index header (`CommitWatch`) is the same bytes exactly while no transaction commits, through
        this connection or any other, in any process. A new header gets a new snapshot: the generation read
        again.
        """
        if self._commits is None:
            return None
        header = self._commits.header()
        snapshot = self._snapshot_now
        if snapshot is not None and snapshot.header == header:
            return snapshot
        with self._fresh_lock:
            row = self._fresh_conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        # Read in a transaction begun after the header was read, the generation is never older than it. A slower
        # thread may store an older snapshot after a newer one: its header then differs from the next one read,
        # and that call makes a new one.
        snapshot = self._snapshot_now = _Snapshot(header, int(row[0]))
        return snapshot

    def current_generation(self) -> int:
        """`generation` as of this call (even while other threads' reads run on the main connection); asked
        before every search, it reads SQLite only after a commit."""
        snapshot = self._snapshot()
        if snapshot is not None:
            return snapshot.generation
        with self._fresh_lock:
            return int(self._fresh_conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    @property
    def next_fid(self) -> int:
        """Every fid ever given out is below this."""
        return self._meta("next_fid", self._conn)

    def sync_point(self) -> SyncPoint:
        """(generation, last change seq, next fid) as of one snapshot of the read connection; inside a
        read_transaction, of that transaction's snapshot."""
        row = self._conn.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'generation'), "
            "(SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)), "
            "(SELECT value FROM meta WHERE key = 'next_fid')"
        ).fetchone()
        return SyncPoint(int(row[0]), int(row[1]), int(row[2]))

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file and fsync both; False when readers or a writer of other processes
        kept part of it from completing within lock_timeout (what committed is safe in the WAL all the same)."""
        with self._write_lock:
            row = self._write_conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        busy, frames, copied = (int(value) for value in row)
        return busy == 0 and frames == copied

    # --- writes -------------------------------------------------------------------------------------------

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload], merge_existing: bool = False
    ) -> VectorChanges:
        """Insert or overwrite points in one transaction; a repeated id keeps its last vector and payload.

        A point whose vector is byte-identical keeps its fid (only the payload is written), so re-indexing
        unchanged images leaves the FAISS index alone. merge_existing: a stored id keeps its vector, and its
        payload is merged with the new one (`merged_payload`) in this transaction.
        """
        last = {point_id: i for i, point_id in enumerate(ids)}
        rows = sorted(last.values())
        payloads = list(payloads)
        texts = {i: encode_payload(payloads[i]) for i in rows}
        blobs = {i: vectors[i].astype(_FLOAT32, copy=False).tobytes() for i in rows}
        with self._transaction() as conn:
            seq_before = self._last_seq(conn)
            payload_column = "points.payload" if merge_existing else "NULL"  # only a merge reads stored payloads
            existing = {
                point_id: (fid, blob, text)
                for point_id, fid, blob, text in conn.execute(
                    f"SELECT points.id, points.fid, vectors.vector, {payload_column} "
                    "FROM points JOIN vectors USING (fid) WHERE points.id IN (SELECT value FROM json_each(?))",
                    (_as_json_array([ids[i] for i in rows]),),
                )
            }
            if merge_existing:
                for i in rows:
                    if ids[i] in existing:
                        _, blobs[i], stored = existing[ids[i]]  # the stored vector stays: a payload-only write
                        payloads[i] = merged_payload(json.loads(stored), payloads[i])
                        texts[i] = encode_payload(payloads[i])
            same = [i for i in rows if ids[i] in existing and existing[ids[i]][1] == blobs[i]]
            same_set = set(same)
            changed = [i for i in rows if i not in same_set]
            removed = [existing[ids[i]][0] for i in changed if ids[i] in existing]
            self._unindex_texts([*removed, *(existing[ids[i]][0] for i in same)])
            if removed:
                removed_json = _as_json_array(removed)
                conn.execute("DELETE FROM points WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,))
                conn.execute("DELETE FROM vectors WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,))
            first_fid = self._meta("next_fid")
            fids = np.arange(first_fid, first_fid + len(changed), dtype=np.int64)
            conn.executemany(
                "INSERT INTO points (fid, id, payload) VALUES (?, ?, ?)",
                [(int(fid), ids[i], texts[i]) for fid, i in zip(fids, changed, strict=True)],
            )
            conn.executemany(
                "INSERT INTO vectors (fid, vector) VALUES (?, ?)",
                [(int(fid), blobs[i]) for fid, i in zip(fids, changed, strict=True)],
            )
            conn.executemany("UPDATE points SET payload = ? WHERE id = ?", [(texts[i], ids[i]) for i in same])
            self._index_texts(
                [(int(fid), payloads[i]) for fid, i in zip(fids, changed, strict=True)]
                + [(existing[ids[i]][0], payloads[i]) for i in same]
            )
            if changed:
                self._set_meta("next_fid", first_fid + len(changed))
                self._set_meta("generation", self._meta("generation") + 1)
            generation = self._meta("generation")
            seq_after = self._last_seq(conn)
        return VectorChanges(
            added_fids=fids,
            added_vectors=np.ascontiguousarray(vectors[changed], dtype=np.float32),
            removed_fids=np.asarray(removed, dtype=np.int64),
            generation=generation,
            seq_before=seq_before,
            seq_after=seq_after,
            next_fid=first_fid + len(changed),
        )

    def delete(self, ids: Sequence[str], only_if_empty: Sequence[str] = ()) -> VectorChanges:
        """Delete the points that exist among ids (with only_if_empty: whose fields of these names are missing,
        null or empty); their fids come back as removed."""
        if any(not name.isidentifier() for name in only_if_empty):
            raise InvalidQuery(f"only_if_empty names payload fields; got {list(only_if_empty)!r}")
        empty = "".join(
            f" AND coalesce(json_extract(payload, '$.\"{name}\"'), '') IN ('', '[]', '{{}}')" for name in only_if_empty
        )
        with self._transaction() as conn:
            seq_before = self._last_seq(conn)
            removed = [
                fid
                for (fid,) in conn.execute(
                    f"SELECT fid FROM points WHERE id IN (SELECT value FROM json_each(?)){empty}",
                    (_as_json_array(ids),),
                )
            ]
            if removed:
                removed_json = _as_json_array(removed)
                conn.execute("DELETE FROM points WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,))
                conn.execute("DELETE FROM vectors WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,))
                self._unindex_texts(removed)
                self._set_meta("generation", self._meta("generation") + 1)
            generation = self._meta("generation")
            seq_after = self._last_seq(conn)
            next_fid = self._meta("next_fid")
        return VectorChanges(
            added_fids=np.empty(0, dtype=np.int64),
            added_vectors=np.empty((0, self.dim), dtype=np.float32),
            removed_fids=np.asarray(removed, dtype=np.int64),
            generation=generation,
            seq_before=seq_before,
            seq_after=seq_after,
            next_fid=next_fid,
        )

    def set_payload(self, id: str, payload: Payload) -> tuple[int, int] | None:
        """Replace one point's payload: (change seq before, after), or None when the id does not exist."""
        text = encode_payload(payload)
        with self._transaction() as conn:
            seq_before = self._last_seq(conn)
            row = conn.execute("SELECT fid FROM points WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE points SET payload = ? WHERE fid = ?", (text, row[0]))
            self._unindex_texts([row[0]])
            self._index_texts([(row[0], payload)])
            return seq_before, self._last_seq(conn)

    def update_payloads(
        self, updates: Mapping[str, PayloadUpdate]
    ) -> tuple[dict[str, Payload], tuple[int, int]]:
        """Apply each update to the payload as stored at the time of the transaction, in one transaction:
        (the new payloads of the ids that exist, (change seq before, after))."""
        wanted = [point_id for point_id, update in updates.items() if not update.is_empty()]
        results: dict[str, Payload] = {}
        with self._transaction() as conn:
            seq_before = self._last_seq(conn)
            rows = conn.execute(
                "SELECT fid, id, payload FROM points WHERE id IN (SELECT value FROM json_each(?))",
                (_as_json_array(list(updates)),),
            ).fetchall()
            changed: list[tuple[int, Payload, str]] = []
            todo = set(wanted)
            for fid, point_id, text in rows:
                payload = json.loads(text)
                if point_id not in todo:
                    results[point_id] = payload
                    continue
                new = updates[point_id].apply(payload)
                results[point_id] = new
                if new != payload:
                    changed.append((fid, new, encode_payload(new)))
            if changed:
                conn.executemany("UPDATE points SET payload = ? WHERE fid = ?", [(t, f) for f, _, t in changed])
                self._unindex_texts([fid for fid, _, _ in changed])
                self._index_texts([(fid, payload) for fid, payload, _ in changed])
            seq_after = self._last_seq(conn)
        return {point_id: results[point_id] for point_id in updates if point_id in results}, (seq_before, seq_after)

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> id of a point whose `paths` hold it (the smallest id when several do), through `point_paths`."""
        rows = self._conn.execute(
            "SELECT pp.path, points.id FROM json_each(?) AS asked JOIN point_paths AS pp ON pp.path = asked.value "
            "JOIN points ON points.fid = pp.fid ORDER BY points.id",
            (_as_json_array([str(path) for path in paths]),),
        )
        found: dict[str, str] = {}
        for path, point_id in rows:
            found.setdefault(path, point_id)
        return found

    def index_delta(self, seq: int, synced_next_fid: int) -> IndexDelta | None:
        """What the change log says the FAISS index must do to go from the state at change `seq` (when every fid
        below synced_next_fid that existed was indexed) to now, read in one snapshot; None when the log no
        longer reaches back to seq. Costs what changed, not the collection.

        Fids are never reused, so a logged fid at or above synced_next_fid is new (added when it still exists);
        one below it was indexed then (removed when it no longer exists; a payload change leaves it).
        """
        with self.read_transaction():
            now = self.sync_point()
            if now.seq == seq:
                return IndexDelta(_NO_FIDS, np.empty((0, self.dim), dtype=np.float32), _NO_FIDS, now)
            oldest = self._conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
            if oldest is None or oldest > seq + 1:
                return None
            fids = [fid for (fid,) in self._conn.execute("SELECT DISTINCT fid FROM changes WHERE seq > ?", (seq,))]
            new = [fid for fid in fids if fid >= synced_next_fid]
            old = [fid for fid in fids if fid < synced_next_fid]
            added: list[tuple[int, bytes]] = self._conn.execute(
                "SELECT fid, vector FROM vectors WHERE fid IN (SELECT value FROM json_each(?)) ORDER BY fid",
                (_as_json_array(new),),
            ).fetchall()
            alive = {
                fid
                for (fid,) in self._conn.execute(
                    "SELECT fid FROM points WHERE fid IN (SELECT value FROM json_each(?))", (_as_json_array(old),)
                )
            }
        added_fids = np.fromiter((fid for fid, _ in added), dtype=np.int64, count=len(added))
        vectors = np.frombuffer(b"".join(blob for _, blob in added), dtype=_FLOAT32).reshape(len(added), self.dim)
        removed = np.asarray(sorted(fid for fid in old if fid not in alive), dtype=np.int64)
        return IndexDelta(added_fids, vectors.astype(np.float32), removed, now)

    # --- reads --------------------------------------------------------------------------------------------

    def _vector(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype=_FLOAT32).astype(np.float32)

    def get(self, ids: Sequence[str], with_vectors: bool) -> list[Record]:
        """The points that exist among ids, in the order asked."""
        vector_column = "vectors.vector" if with_vectors else "NULL"
        vector_join = "JOIN vectors ON vectors.fid = points.fid" if with_vectors else ""
        rows = self._conn.execute(
            f"SELECT points.id, points.payload, {vector_column} FROM json_each(?) AS asked "
            f"JOIN points ON points.id = asked.value {vector_join} ORDER BY asked.key",
            (_as_json_array(ids),),
        )
        return [
            Record(point_id, json.loads(text), self._vector(blob) if with_vectors else None)
            for point_id, text, blob in rows
        ]

    def count(self, filter: Filter | None) -> int:
        condition, params = filter_sql(filter)
        return int(self._conn.execute(f"SELECT count(*) FROM points WHERE {condition}", params).fetchone()[0])

    def page(
        self, filter: Filter | None, after_id: str | None, limit: int, with_vectors: bool
    ) -> list[Record]:
        """Up to `limit` matching points with id > after_id, ordered by id (keyset pagination)."""
        condition, params = filter_sql(filter)
        if after_id is not None:
            condition += " AND points.id > ?"
            params = [*params, after_id]
        vector_column = "vectors.vector" if with_vectors else "NULL"
        vector_join = "JOIN vectors ON vectors.fid = points.fid" if with_vectors else ""
        rows = self._conn.execute(
            f"SELECT points.id, points.payload, {vector_column} FROM points {vector_join} "
            f"WHERE {condition} ORDER BY points.id LIMIT ?",
            [*params, limit],
        )
        return [
            Record(point_id, json.loads(text), self._vector(blob) if with_vectors else None)
            for point_id, text, blob in rows
        ]

    def matching_fids(self, filter: Filter | None) -> np.ndarray:
        """The fids of every point the filter matches (all points for no filter), ascending."""
        condition, params = filter_sql(filter)
        rows = self._conn.execute(f"SELECT fid FROM points WHERE {condition} ORDER BY fid", params).fetchall()
        return np.fromiter((fid for (fid,) in rows), dtype=np.int64, count=len(rows))

    def vectors(self, fids: np.ndarray) -> np.ndarray:
        """The vectors of fids (which must exist), in the order given, as a (len(fids), dim) float32 array."""
        blobs = [
            blob
            for (blob,) in self._conn.execute(
                "SELECT vectors.vector FROM json_each(?) AS asked JOIN vectors ON vectors.fid = asked.value "
                "ORDER BY asked.key",
                (_as_json_array(fids),),
            )
        ]
        if len(blobs) != len(fids):
            raise LookupError(f"{self.path}: {len(fids) - len(blobs)} of the asked vectors are missing")
        return np.frombuffer(b"".join(blobs), dtype=_FLOAT32).reshape(len(fids), self.dim).astype(np.float32)

    def present_vectors(self, fids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Those of fids that exist now, in the order given, and their vectors (for readers that may lag)."""
        rows = self._conn.execute(
            "SELECT vectors.fid, vectors.vector FROM json_each(?) AS asked JOIN vectors ON vectors.fid = asked.value "
            "ORDER BY asked.key",
            (_as_json_array(fids),),
        ).fetchall()
        present = np.fromiter((fid for fid, _ in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=_FLOAT32).reshape(len(rows), self.dim)
        return present, matrix.astype(np.float32)

    def iter_vectors(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (fids, vectors) pair in batches, ordered by fid."""
        after = -1
        while True:
            rows = self._conn.execute(
                "SELECT fid, vector FROM vectors WHERE fid > ? ORDER BY fid LIMIT ?", (after, batch_size)
            ).fetchall()
            if not rows:
                return
            fids = np.fromiter((fid for fid, _ in rows), dtype=np.int64, count=len(rows))
            matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=_FLOAT32).reshape(
                len(rows), self.dim
            )
            yield fids, matrix.astype(np.float32)
            after = int(fids[-1])

    def text_statistics(self, terms: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        """(documents with words, words in all of them, documents holding each term) over the whole collection."""
        containing: dict[str, int] = {}
        for term in terms:
            row = self._conn.execute("SELECT doc FROM texts_vocab WHERE term = ?", (term,)).fetchone()
            containing[term] = int(row[0]) if row else 0
        return self._meta("text_documents", self._conn), self._meta("text_words", self._conn), containing

    def text_matches(self, terms: Sequence[str], filter: Filter | None) -> list[tuple[int, str, str]]:
        """(fid, id, indexed words) of every point matching filter whose words include any of terms."""
        if not terms:
            return []
        # each term quoted: FTS5 reads it as a string, never as an operator (OR, NOT, NEAR) or a column filter
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        condition, params = filter_sql(filter)
        rows = self._conn.execute(
            "SELECT points.fid, points.id, texts.body FROM texts JOIN points ON points.fid = texts.rowid "
            f"WHERE texts MATCH ? AND {condition}",
            [match, *params],
        )
        return [(int(fid), point_id, body) for fid, point_id, body in rows]

    def ids_and_payloads(self, fids: Sequence[int] | np.ndarray) -> dict[int, tuple[str, str]]:
        """fid -> (id, payload JSON text) for the fids that exist, as of this call (or later).

        From the copy of every point in memory, brought up to date first after a commit; for a collection over
        MIRROR_MAX_POINTS, or without a commit watch, from SQLite.
        """
        fid_list = fids.tolist() if isinstance(fids, np.ndarray) else fids
        if self._commits is None:
            return _points(self._conn, fid_list)
        mirror = self._mirror_now(self._commits)
        if mirror is None:
            with self._fresh_lock:
                return _points(self._fresh_conn, fid_list)
        return {fid: point for fid in fid_list if (point := mirror.get(fid)) is not None}

    def _mirror_now(self, commits: CommitWatch) -> dict[int, tuple[str, str]] | None:
        """The copy of `points` in memory, holding every commit made before this call; None when too large.

        Threads may read the copy while another applies a commit to it: what they see is then as of that
        commit or the one before, as a search that overlaps a commit may see either.
        """
        header = commits.header()  # before the read that follows: the copy is never older than this header
        if header == self._mirror_header:
            return self._mirror
        with self._fresh_lock:
            if header != self._mirror_header:  # else another thread brought it up to date meanwhile
                self._update_mirror()
                self._mirror_header = header
            return self._mirror

    def _update_mirror(self) -> None:
        """Apply the change log since the copy's last change, in one read transaction; read every point when
        there is no copy yet or the log no longer reaches back to it. The caller holds `_fresh_lock`."""
        conn = self._fresh_conn
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            last = int(row[0]) if row else 0
            if self._mirror is not None and last == self._mirror_seq:
                return  # a commit that changed no point (a vector-less meta write, a checkpoint)
            if self._mirror is None and self._mirror_seq >= 0 and last - self._mirror_seq < self._mirror_excess:
                return  # still too large: fitting takes a delete (a row of the log) per point over the limit
            oldest = conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
            if self._mirror is not None and oldest is not None and oldest <= self._mirror_seq + 1:
                changed = [
                    fid
                    for (fid,) in conn.execute("SELECT DISTINCT fid FROM changes WHERE seq > ?", (self._mirror_seq,))
                ]
                current = _points(conn, changed)
                for fid in changed:
                    point = current.get(fid)
                    if point is None:
                        self._mirror.pop(fid, None)
                    else:
                        self._mirror[fid] = point
            elif (count := conn.execute("SELECT count(*) FROM points").fetchone()[0]) <= self.mirror_max_points:
                rows = conn.execute("SELECT fid, id, payload FROM points")
                self._mirror = {fid: (point_id, text) for fid, point_id, text in rows}
            else:
                self._mirror, self._mirror_excess = None, count - self.mirror_max_points
            self._mirror_seq = last
        finally:
            conn.execute("COMMIT")


@dataclass(frozen=True)
class _Snapshot:
    """What PayloadDB read after seeing one WAL-index header: valid until a commit changes it."""

    header: bytes
    generation: int


def _points(conn: sqlite3.Connection, fids: Sequence[int]) -> dict[int, tuple[str, str]]:
    rows = conn.execute(
        "SELECT fid, id, payload FROM points WHERE fid IN (SELECT value FROM json_each(?))",
        (_as_json_array(fids),),
    )
    return {fid: (point_id, text) for fid, point_id, text in rows}
