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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from retriever.keywords import payload_words
from retriever.store import Filter, Payload, Record

SCHEMA_VERSION = 2  # 2: the `texts` full-text index, built on open for collections made before it (`changes`
# and its triggers are made on open too, with nothing to fill: a copy in memory starts by reading every point)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    fid INTEGER PRIMARY KEY,   -- the FAISS id
    id TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL      -- JSON; its words are in `texts` under the same fid
);
-- Apart from `points` so that filter scans over payloads do not read a 2 KB blob per row.
CREATE TABLE IF NOT EXISTS vectors (
    fid INTEGER PRIMARY KEY,
    vector BLOB NOT NULL       -- float32, little-endian, `dim` values
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('generation', 0), ('next_fid', 0),
    ('text_documents', 0), ('text_words', 0);
-- The fids of `points` rows changed by each commit, in commit order, for readers' copies in memory to follow.
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, fid INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS points_inserted AFTER INSERT ON points BEGIN
    INSERT INTO changes (fid) VALUES (NEW.fid);
END;
CREATE TRIGGER IF NOT EXISTS points_updated AFTER UPDATE ON points BEGIN
    INSERT INTO changes (fid) SELECT OLD.fid UNION SELECT NEW.fid;
END;
CREATE TRIGGER IF NOT EXISTS points_deleted AFTER DELETE ON points BEGIN
    INSERT INTO changes (fid) VALUES (OLD.fid);
END;
"""

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

    def is_empty(self) -> bool:
        return len(self.added_fids) == 0 and len(self.removed_fids) == 0


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
    """

    HEADER_BYTES = 48
    FORMAT_VERSION = 3007000

    def __init__(self, view: mmap.mmap) -> None:
        self._view = view

    @classmethod
    def open(cls, path: Path) -> CommitWatch | None:
        """A watch on the `-shm` file at path, or None when there is none or it is not in the known format."""
        try:
            with open(path, "rb") as file:
                if os.fstat(file.fileno()).st_size < cls.HEADER_BYTES:
                    return None
                view = mmap.mmap(file.fileno(), cls.HEADER_BYTES, access=mmap.ACCESS_READ)  # keeps its own fd
        except (OSError, ValueError):
            return None
        watch = cls(view)
        header = watch.header()
        if int.from_bytes(header[0:4], sys.byteorder) != cls.FORMAT_VERSION or header[12] != 1:
            watch.close()
            return None
        return watch

    def header(self) -> bytes:
        """The header's first copy, the one a commit writes last."""
        return self._view[: self.HEADER_BYTES]

    def close(self) -> None:
        self._view.close()


class PayloadDB:
    """One collection's SQLite file (WAL mode). Not locked itself: the store serialises calls."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in `_transaction`
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Takes effect only on a new file. With 4 KB pages a 2 KB vector row (dim 512) fits once per page,
        # wasting half the file; 16 KB pages hold seven.
        self._conn.execute("PRAGMA page_size=16384")
        wal = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        # NORMAL: a commit survives a process crash; `checkpoint()` (in save) makes it survive power loss
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._ensure_texts()
        # What every search reads, kept while no transaction commits (see `_snapshot`): read through a connection
        # of its own, one statement at a time. A statement on a connection where another thread's statement is
        # still running joins that one's read transaction, and so may miss commits made since it began.
        self._fresh_conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Its pages are `points` rows (vectors go through the main connection), read when the collection is too
        # large for the copy in memory: room for all of them in a collection of 200k points with short payloads.
        self._fresh_conn.execute(f"PRAGMA cache_size=-{FRESH_CACHE_KIB}")
        self._fresh_lock = threading.Lock()
        self._snapshot_now: _Snapshot | None = None
        # fid -> (id, payload JSON) of every point, as of the last change applied (None: not read, or too large)
        self._mirror: dict[int, tuple[str, str]] | None = None
        self._mirror_seq = -1  # the last row of `changes` applied to it; -1: never read
        self._mirror_header = b""  # the WAL-index header seen before it was last brought up to date
        self._mirror_excess = 0  # points over MIRROR_MAX_POINTS when last counted: the deletes it takes to fit
        # after the first reads: the -shm file exists and is initialised
        self._commits = CommitWatch.open(Path(f"{path}-shm")) if wal else None

    def _ensure_texts(self) -> None:
        """Create the full-text index, filling it from `points` when the collection predates it."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'texts'"
        if self._conn.execute(exists).fetchone():
            return
        with self._transaction() as conn:
            if conn.execute(exists).fetchone():
                return  # another process made it meanwhile
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
            self._set_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        self._mirror = None
        if self._commits is not None:
            self._commits.close()
            self._commits = None
        self._fresh_conn.close()
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute(
                "DELETE FROM changes WHERE seq <= (SELECT seq FROM sqlite_sequence WHERE name = 'changes') - ?",
                (CHANGE_LOG_KEEP,),
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Reads inside see one snapshot of the database: commits made meanwhile (by any connection) are not seen.

        For a caller that reads in several statements and needs them to agree (fids, then their vectors); the
        caller keeps other threads off this connection meanwhile (FaissStore's write lock).
        """
        self._conn.execute("BEGIN")  # deferred: the snapshot is taken by the first read
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _meta(self, key: str) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _index_texts(self, rows: Sequence[tuple[int, Payload]]) -> None:
        """Add the words of (fid, payload) rows to `texts`; rows without words are left out of the corpus."""
        entries = [(fid, " ".join(words), len(words)) for fid, payload in rows if (words := payload_words(payload))]
        if entries:
            self._conn.executemany("INSERT INTO texts (rowid, body, length) VALUES (?, ?, ?)", entries)
            self._add_text_totals(len(entries), sum(length for _, _, length in entries))

    def _unindex_texts(self, fids: Sequence[int]) -> None:
        """Remove the words of fids from `texts` (one statement per fid: FTS5 looks up rowid = ? directly)."""
        lengths = [
            row[0]
            for fid in fids
            if (row := self._conn.execute("SELECT length FROM texts WHERE rowid = ?", (fid,)).fetchone())
        ]
        if lengths:
            self._conn.executemany("DELETE FROM texts WHERE rowid = ?", [(fid,) for fid in fids])
            self._add_text_totals(-len(lengths), -sum(lengths))

    def _add_text_totals(self, documents: int, words: int) -> None:
        self._set_meta("text_documents", self._meta("text_documents") + documents)
        self._set_meta("text_words", self._meta("text_words") + words)

    @property
    def generation(self) -> int:
        """Bumped by every commit that adds or removes a (fid, vector) pair; payload-only changes leave it."""
        return self._meta("generation")

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
        return self._meta("next_fid")

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and fsync both."""
        self._conn.execute("PRAGMA wal_checkpoint(FULL)")

    # --- writes -------------------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload]) -> VectorChanges:
        """Insert or overwrite points in one transaction; a repeated id keeps its last vector and payload.

        A point whose vector is byte-identical keeps its fid (only the payload is written), so re-indexing
        unchanged images leaves the FAISS index alone.
        """
        last = {point_id: i for i, point_id in enumerate(ids)}
        rows = sorted(last.values())
        texts = {i: encode_payload(payloads[i]) for i in rows}
        blobs = {i: vectors[i].astype(_FLOAT32, copy=False).tobytes() for i in rows}
        with self._transaction() as conn:
            existing = {
                point_id: (fid, blob)
                for point_id, fid, blob in conn.execute(
                    "SELECT points.id, points.fid, vectors.vector FROM points JOIN vectors USING (fid) "
                    "WHERE points.id IN (SELECT value FROM json_each(?))",
                    (_as_json_array([ids[i] for i in rows]),),
                )
            }
            same = [i for i in rows if ids[i] in existing and existing[ids[i]][1] == blobs[i]]
            same_set = set(same)
            changed = [i for i in rows if i not in same_set]
            removed = [existing[ids[i]][0] for i in changed if ids[i] in existing]
            self._unindex_texts([*removed, *(existing[ids[i]][0] for i in same)])
            if removed:
                removed_json = _as_json_array(removed)
                conn.execute(
                    "DELETE FROM points WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,)
                )
                conn.execute(
                    "DELETE FROM vectors WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,)
                )
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
        return VectorChanges(
            added_fids=fids,
            added_vectors=np.ascontiguousarray(vectors[changed], dtype=np.float32),
            removed_fids=np.asarray(removed, dtype=np.int64),
            generation=generation,
        )

    def delete(self, ids: Sequence[str]) -> VectorChanges:
        """Delete the points that exist among ids; their fids come back as removed."""
        with self._transaction() as conn:
            removed = [
                fid
                for (fid,) in conn.execute(
                    "SELECT fid FROM points WHERE id IN (SELECT value FROM json_each(?))",
                    (_as_json_array(ids),),
                )
            ]
            if removed:
                removed_json = _as_json_array(removed)
                conn.execute(
                    "DELETE FROM points WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,)
                )
                conn.execute(
                    "DELETE FROM vectors WHERE fid IN (SELECT value FROM json_each(?))", (removed_json,)
                )
                self._unindex_texts(removed)
                self._set_meta("generation", self._meta("generation") + 1)
            generation = self._meta("generation")
        return VectorChanges(
            added_fids=np.empty(0, dtype=np.int64),
            added_vectors=np.empty((0, self.dim), dtype=np.float32),
            removed_fids=np.asarray(removed, dtype=np.int64),
            generation=generation,
        )

    def set_payload(self, id: str, payload: Payload) -> bool:
        """Replace one point's payload; False when the id does not exist."""
        text = encode_payload(payload)
        with self._transaction() as conn:
            row = conn.execute("SELECT fid FROM points WHERE id = ?", (id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE points SET payload = ? WHERE fid = ?", (text, row[0]))
            self._unindex_texts([row[0]])
            self._index_texts([(row[0], payload)])
        return True

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
        return self._meta("text_documents"), self._meta("text_words"), containing

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
            elif (count := conn.execute("SELECT count(*) FROM points").fetchone()[0]) <= MIRROR_MAX_POINTS:
                rows = conn.execute("SELECT fid, id, payload FROM points")
                self._mirror = {fid: (point_id, text) for fid, point_id, text in rows}
            else:
                self._mirror, self._mirror_excess = None, count - MIRROR_MAX_POINTS
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
