"""The embedded vector store: payloads and vectors in SQLite (the truth), a FAISS index beside them (a cache).

Files in a collection's directory:
  manifest.json    what built the collection; written atomically, last, when it is created
  payloads.sqlite  points, payloads, vectors and a generation counter (see retriever/payload_db.py)
  index.faiss      the FAISS index, replaced atomically by `save()`
  index.json       the generation the index reflects and which index.faiss it describes, written atomically after it

Crash safety: every write commits to SQLite first and then updates the in-memory index. FAISS ids (fids) are
never reused, so on open any index file, whatever its age, is brought up to date by set differences of fids
with SQLite (add what is missing, drop what was deleted); an unreadable index is rebuilt from SQLite. The same
catch-up runs before a search when another process has committed (the generation moved), so an API process
sees what a worker process indexes; one writer at a time is still the intended use.

Deletes: the flat and IVF-PQ indexes remove ids in place; HNSW cannot, so deleted fids become tombstones
that an IDSelector excludes at search, and the graph is rebuilt from SQLite once they pass a fifth of it.

Keyword search reads SQLite alone: an FTS5 index of the words of paths, tags and captions (see payload_db.py).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import heapq
import json
import math
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import faiss
import numpy as np

from retriever.errors import (
    CollectionClosed,
    CollectionCorrupt,
    CollectionNotFound,
    EncoderMismatch,
    InvalidQuery,
    InvalidStoreSettings,
    PointNotFound,
    SaveFailed,
    StorageFull,
    StoreBusy,
    StoreUnavailable,
)
from retriever.faiss_device import FaissDevice, GpuFlatSearch, resolve_faiss_device, train_ivf
from retriever.keywords import bm25, idf, query_terms
from retriever.payload_db import MIRROR_MAX_POINTS, PayloadDB, VectorChanges
from retriever.store import (
    Filter,
    Hit,
    Manifest,
    Payload,
    PayloadUpdate,
    Record,
    check_page,
    checked_query_vector,
)

MANIFEST_FILE = "manifest.json"
PAYLOADS_FILE = "payloads.sqlite"
INDEX_FILE = "index.faiss"
INDEX_META_FILE = "index.json"
SAVE_LOCK_FILE = ".save.lock"  # held while index.faiss and index.json are replaced, so they agree
INDEX_TYPES = ("flat", "hnsw", "ivfpq")

HNSW_REBUILD_FRACTION = 0.2  # rebuild the graph when this share of its nodes are tombstones
# Other processes' vectors wait beside an HNSW graph (searched exactly) until this many have come; then a background
# thread of the searching process inserts them into the graph, this many per hold of the index's write lock.
HNSW_MERGE_AT = 1024
HNSW_MERGE_BATCH = 64
IVF_RETRAIN_GROWTH = 4  # retrain IVF-PQ when the collection is this many times what it was trained on
IVF_TRAIN_SAMPLE = 65536  # k-means cost grows with the sample; this many points fit nlist <= 1600 well
# IVF-PQ candidates re-scored exactly; pages stay stable while offset + k <= RESCORE_POOL // 4
RESCORE_POOL = 256
# Filters matching at most EXACT_SEARCH_ROWS points, or EXACT_SEARCH_SHARE of them, are answered by an exact
# scan on approximate indexes: graph search through a sparse selection loses recall; few rows scan fast.
EXACT_SEARCH_ROWS = 4096
EXACT_SEARCH_SHARE = 0.05


@dataclass(frozen=True)
class IndexSettings:
    """Build and search parameters of the FAISS index; build parameters apply when an index is (re)built."""

    hnsw_m: int = 32
    hnsw_ef_search: int | None = None  # None: grows with the collection (default_ef_search)
    ivf_nlist: int | None = None  # None: about 4 * sqrt(n) at training time
    ivf_nprobe: int = 16
    pq_m: int = 32
    # faiss's default of 40 gave recall@10 0.956 at efSearch 128 on 200k embedding-like vectors; 80 gave 0.997
    # for about the same build time (bench/stores.py, BENCHMARKS.md)
    hnsw_ef_construction: int = 80
    device: FaissDevice = "cpu"  # cuda: flat search and IVF-PQ training on the GPU (retriever/faiss_device.py)

    def check(self, manifest: Manifest) -> None:
        """Raise InvalidStoreSettings for parameters that cannot build manifest's index."""
        if manifest.index_type not in INDEX_TYPES:
            raise InvalidStoreSettings(
                f"index type {manifest.index_type!r} is not one of {', '.join(INDEX_TYPES)}"
            )
        if manifest.store != "faiss":
            raise InvalidStoreSettings(f"manifest store is {manifest.store!r}; the FAISS store needs 'faiss'")
        if manifest.dim < 1:
            raise InvalidStoreSettings(f"manifest dim must be positive, got {manifest.dim}")
        for name in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction", "ivf_nprobe", "pq_m"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidStoreSettings(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise InvalidStoreSettings(f"ivf_nlist must be at least 1, got {self.ivf_nlist}")
        if manifest.index_type == "ivfpq" and manifest.dim % self.pq_m:
            raise InvalidStoreSettings(f"pq_m={self.pq_m} must divide the embedding dimension {manifest.dim}")

    def nlist_for(self, n: int) -> int:
        return self.ivf_nlist or max(1, round(4 * math.sqrt(n)))

    def ivf_trainable(self, n: int) -> bool:
        """Enough points for k-means on nlist centroids (39 per centroid) and for 8-bit PQ codebooks (256)."""
        return n >= max(39 * self.nlist_for(n), 256)


@dataclass(frozen=True)
class IndexInfo:
    """What the FAISS side holds, for tests, metrics and benchmarks."""

    kind: str  # flat | hnsw | ivfpq; "flat" also while an ivfpq collection is too small to train
    indexed: int  # live vectors the index answers for (entries minus tombstones)
    tombstones: int
    trained_on: int  # points the IVF-PQ index was trained on; 0 for other kinds
    file_bytes: int | None  # size of index.faiss on disk, None before the first save


def default_ef_search(count: int) -> int:
    """efSearch for an HNSW graph of `count` vectors when none is set: 128 up to 200k, then growing with the
    fourth root of the size (192 at 1M, 352 at 10M), in steps of 16, at most 1024.

    Recall at one efSearch falls as the graph grows. On embedding-like vectors (bench/stores.py, BENCHMARKS.md)
    efSearch 128 gave recall@10 0.98–0.99 at 200k but 0.945–0.975 at 1M, where 192 gave 0.985.
    """
    grown = 128 * max(1.0, count / 200_000) ** 0.25
    return min(1024, 16 * math.ceil(grown / 16))


# --- the FAISS index kinds ---------------------------------------------------------------------------------


class _FaissIndex:
    """One FAISS index over (fid, vector) pairs; subclasses differ in how they search and forget fids."""

    kind = ""
    complete = True  # the top n of a search are the true top n
    stores_vectors = True  # exact vectors can be read back (reconstruct)

    def __init__(self, index: Any) -> None:
        self.index = index

    def add(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, fids)

    def add_later(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors that a search is waiting for (another process's commit): as cheaply as it can now."""
        self.add(fids, vectors)

    @property
    def pending(self) -> int:
        """Vectors added with add_later that are not in the main structure yet (HNSW only)."""
        return 0

    def merge_pending(self, limit: int | None = None) -> int:
        """Move up to limit pending vectors into the main structure; how many moved."""
        return 0

    def remove(self, fids: np.ndarray) -> None:
        self.index.remove_ids(faiss.IDSelectorBatch(fids))

    def entries(self) -> np.ndarray:
        """Every fid the index holds an entry for, live or not."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def live(self) -> int:
        return int(self.index.ntotal)

    @property
    def tombstones(self) -> int:
        return 0

    def needs_rebuild(self) -> bool:
        return False

    def pool_size(self, need: int) -> int:
        """How many candidates to ask for to answer the top `need` (one extra to see ties at the cut)."""
        return need + 1

    def narrow_pool(self, need: int) -> int | None:
        """A cheaper first try than pool_size(need) giving the same top `need` when decisive (HNSW only)."""
        return None

    def search(self, query: np.ndarray, n: int, selector: Any | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, fids) of the best n candidates, best first; selector restricts the fids considered."""
        params = faiss.SearchParameters()
        params.sel = selector
        scores, fids = self.index.search(query, n, params=params)
        return scores[0], fids[0]

    def default_selector(self) -> Any | None:
        return None

    def vectors(self, fids: np.ndarray) -> np.ndarray:
        return np.asarray(self.index.reconstruct_batch(fids), dtype=np.float32)


class _FlatIndex(_FaissIndex):
    kind = "flat"

    def __init__(self, index: Any, device: FaissDevice = "cpu") -> None:
        super().__init__(index)
        # on cuda, unfiltered searches run on a GPU copy; the CPU index stays the one of record
        self._gpu = GpuFlatSearch(index) if device == "cuda" else None

    @classmethod
    def empty(cls, dim: int, device: FaissDevice = "cpu") -> _FlatIndex:
        return cls(faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT), device)

    def add(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(fids, vectors)
        if self._gpu is not None:
            self._gpu.add(fids, vectors)

    def remove(self, fids: np.ndarray) -> None:
        super().remove(fids)
        if self._gpu is not None:
            self._gpu.invalidate()

    def search(self, query: np.ndarray, n: int, selector: Any | None) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is None or selector is not None:
            return super().search(query, n, selector)
        scores, fids = self._gpu.search(query, n)
        return scores[0], fids[0]


class _HnswIndex(_FaissIndex):
    kind = "hnsw"
    complete = False

    def __init__(self, index: Any, ef_search: int | None) -> None:
        super().__init__(index)
        # Vectors of other processes' commits wait here, searched exactly beside the graph, until a background
        # thread inserts them into the graph: an insertion costs about 0.25 ms, so adding 32 in the search that
        # caught up with them made it 25 times slower than a warm one (bench/stores.py, BENCHMARKS.md).
        self._pending = faiss.IndexIDMap2(faiss.IndexFlatIP(index.d))
        self._pending_fids: set[int] = set()
        self._fixed_ef_search = ef_search
        self._default_for = (-1, 0)  # (graph size, default_ef_search of it)
        self._dead: set[int] = set()
        # (IDSelectorNot, the IDSelectorBatch it points to: kept so Python does not free it)
        self._dead_selector: tuple[Any, Any] | None = None
        # (default selector, efSearch, the parameters of a search with both), made once per thread, selector and
        # efSearch.
        # Per thread: faiss's IndexIDMap points the parameters' selector at a translating wrapper of its own for
        # the length of a search, so concurrent searches must not share parameters.
        self._local = threading.local()

    @classmethod
    def empty(cls, dim: int, settings: IndexSettings) -> _HnswIndex:
        index: Any = faiss.index_factory(dim, f"IDMap2,HNSW{settings.hnsw_m}", faiss.METRIC_INNER_PRODUCT)
        graph: Any = faiss.downcast_index(index.index)  # an IndexHNSWFlat, typed as a plain Index by the stubs
        graph.hnsw.efConstruction = settings.hnsw_ef_construction  # kept in the index file
        return cls(index, settings.hnsw_ef_search)

    @property
    def ef_search(self) -> int:
        """The efSearch of searches: the setting, else default_ef_search of the graph's size."""
        if self._fixed_ef_search:
            return self._fixed_ef_search
        total = self.index.ntotal
        if total != self._default_for[0]:  # asked a few times a search: computed once per size
            self._default_for = (total, default_ef_search(total))
        return self._default_for[1]

    def add_later(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        self._pending.add_with_ids(vectors, fids)
        self._pending_fids.update(fids.tolist())

    @property
    def pending(self) -> int:
        return len(self._pending_fids)

    def merge_pending(self, limit: int | None = None) -> int:
        if not self._pending_fids:
            return 0
        fids = faiss.vector_to_array(self._pending.id_map).astype(np.int64)[:limit]
        self.index.add_with_ids(np.asarray(self._pending.reconstruct_batch(fids), dtype=np.float32), fids)
        self._pending.remove_ids(faiss.IDSelectorBatch(fids))
        self._pending_fids.difference_update(fids.tolist())
        return len(fids)

    def entries(self) -> np.ndarray:
        graph = super().entries()
        if not self._pending_fids:
            return graph
        return np.concatenate([graph, faiss.vector_to_array(self._pending.id_map).astype(np.int64)])

    def remove(self, fids: np.ndarray) -> None:
        waiting = {fid for fid in fids.tolist() if fid in self._pending_fids}
        if waiting:  # never in the graph: simply dropped
            self._pending.remove_ids(faiss.IDSelectorBatch(np.fromiter(waiting, dtype=np.int64)))
            self._pending_fids.difference_update(waiting)
            fids = np.asarray([fid for fid in fids.tolist() if fid not in waiting], dtype=np.int64)
        if not len(fids):
            return
        self._dead.update(int(fid) for fid in fids)
        inner = faiss.IDSelectorBatch(np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
        self._dead_selector = (faiss.IDSelectorNot(inner), inner)

    def vectors(self, fids: np.ndarray) -> np.ndarray:
        if not self._pending_fids or not any(fid in self._pending_fids for fid in fids.tolist()):
            return super().vectors(fids)
        return np.stack(
            [
                (self._pending if fid in self._pending_fids else self.index).reconstruct(int(fid))
                for fid in fids.tolist()
            ]
        ).astype(np.float32)

    @property
    def live(self) -> int:
        return int(self.index.ntotal) - len(self._dead) + len(self._pending_fids)

    @property
    def tombstones(self) -> int:
        return len(self._dead)

    def needs_rebuild(self) -> bool:
        return len(self._dead) > HNSW_REBUILD_FRACTION * max(1, self.index.ntotal)

    def pool_size(self, need: int) -> int:
        # The traversal depends on efSearch, not on k: asking for max(need, ef) candidates makes every page
        # with offset + k <= efSearch come from the same candidate list, so pagination is stable.
        return max(need, self.ef_search)

    def narrow_pool(self, need: int) -> int | None:
        """A pool smaller than pool_size(need) that visits the same nodes, or None when there is none.

        faiss's HNSW traversal depends on max(efSearch, k) alone; k only sizes the heap of results. So
        while need + 1 <= efSearch, the best need + 1 of a search for need + 1 are the best need + 1 of the
        candidates a search for pool_size(need) returns (up to the order of ties): when the last two differ
        in score, or fewer come back, the top `need` is the same set.
        """
        if self._pending_fids:
            return None  # the pending vectors' exact top and the graph's are merged over the full pool
        return need + 1 if need < self.ef_search else None

    def _params(self, ef_search: int, selector: Any | None) -> Any:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        params.efSearch = ef_search
        params.sel = selector
        return params

    def search(self, query: np.ndarray, n: int, selector: Any | None) -> tuple[np.ndarray, np.ndarray]:
        ef_search = self.ef_search
        if n <= ef_search and selector is self.default_selector():
            cached = getattr(self._local, "params", None)
            # remove() made a new default selector, or the collection grew into another efSearch
            if cached is None or cached[0] is not selector or cached[1] != ef_search:
                cached = self._local.params = (selector, ef_search, self._params(ef_search, selector))
            params = cached[2]
        else:
            params = self._params(max(ef_search, n), selector)
        scores, fids = self.index.search(query, n, params=params)
        if not self._pending_fids:
            return scores[0], fids[0]
        exact = faiss.SearchParameters()
        exact.sel = selector
        more_scores, more_fids = self._pending.search(query, min(n, self._pending.ntotal), params=exact)
        all_scores = np.concatenate([scores[0], more_scores[0]])
        all_fids = np.concatenate([fids[0], more_fids[0]])
        all_scores[all_fids < 0] = -np.inf  # the missing (-1) last, as a search returns them
        best = np.argsort(-all_scores, kind="stable")[:n]
        return all_scores[best], all_fids[best]

    def default_selector(self) -> Any | None:
        return self._dead_selector[0] if self._dead_selector else None


class _IvfPqIndex(_FaissIndex):
    kind = "ivfpq"
    complete = False
    stores_vectors = False  # PQ codes only: exact scores come from SQLite

    def __init__(self, index: Any, nprobe: int, trained_on: int) -> None:
        super().__init__(index)
        self.nprobe = nprobe
        self.trained_on = trained_on

    def entries(self) -> np.ndarray:
        lists = self.index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(self.index.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def pool_size(self, need: int) -> int:
        return max(4 * need, RESCORE_POOL)

    def search(self, query: np.ndarray, n: int, selector: Any | None) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe
        params.sel = selector
        scores, fids = self.index.search(query, n, params=params)
        return scores[0], fids[0]


def _wrap_loaded(
    index: Any, manifest: Manifest, settings: IndexSettings, trained_on: int
) -> _FaissIndex | None:
    """The loaded FAISS index as the kind manifest asks for, or None when it is another kind or shape."""
    if index.d != manifest.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if isinstance(index, faiss.IndexIVFPQ):
        return (
            _IvfPqIndex(index, settings.ivf_nprobe, trained_on or index.ntotal)
            if manifest.index_type == "ivfpq"
            else None
        )
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSWFlat):
        return _HnswIndex(index, settings.hnsw_ef_search) if manifest.index_type == "hnsw" else None
    if isinstance(inner, faiss.IndexFlat) and manifest.index_type in ("flat", "ivfpq"):
        return _FlatIndex(index, settings.device)  # for ivfpq: the exact stand-in until there is data to train
    return None


# --- files -------------------------------------------------------------------------------------------------

TEMP_FILE_GRACE_SECONDS = 60.0  # an unlocked `.new` temp file younger than this is never taken for abandoned
_CREATE_LOCK_POLL_SECONDS = 0.01


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write path through a temp file in its directory: fsync it, rename it over path, fsync the directory.

    The temp file's name is unique (pid and a random token) and it is flock-ed for as long as it exists under a
    `.tmp` name: it is made as `.new`, locked, and only then renamed to `.tmp`. So a process cleaning up
    abandoned temp files (maybe in another container, whose pids mean nothing here) never deletes one that a
    live writer is writing, and deletes a dead writer's at once.
    """
    stem = f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    staging, tmp = path.with_name(stem + ".new"), path.with_name(stem + ".tmp")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(staging, tmp)
        write(tmp)
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # releases the flock
    _fsync_directory(path.parent)


def _write_text_atomically(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    _write_atomically(path, write)


def _remove_abandoned_temp_files(directory: Path) -> None:
    """Delete temp files left by a process killed mid-save: a `.tmp` file nobody holds the flock of (a writer
    holds it until the rename; a dead one's is gone with it), and a `.new` one past the grace period (a writer
    dies between making and locking it only by a rare chance)."""
    now = time.time()
    for stale in directory.glob(".*.new"):
        with suppress(OSError):
            if now - stale.stat().st_mtime > TEMP_FILE_GRACE_SECONDS:
                stale.unlink(missing_ok=True)
    for tmp in directory.glob(".*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # being written
        else:
            tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _remove_collection_files(directory: Path) -> None:
    """Delete every file a collection keeps, the manifest first: without it the rest is not a collection."""
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for pattern in (INDEX_FILE, INDEX_META_FILE, f"{PAYLOADS_FILE}*", ".*.tmp", ".*.new"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def _is_disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def _storage_full(what: str, error: object) -> StorageFull:
    return StorageFull(
        f"the disk holding {what} is full ({error}): that write was not made and the collection keeps what it held "
        "before; free space on that disk (VLSEARCH_DATA_DIR) and index again (stored images are skipped)"
    )


def _file_identity(path: Path) -> dict[str, int] | None:
    """What tells one version of a file from another (a rename keeps all three); None when it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"inode": stat.st_ino, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def _file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """An exclusive flock on path (created if missing), across processes, waited for at most timeout seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"{what}: another process held {path} for more than {timeout:g}s (VLSEARCH_LOCK_TIMEOUT)"
                    ) from None
                time.sleep(_CREATE_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)


def _creation_lock_path(directory: Path) -> Path:
    """Beside the collection's directory, so that dropping the directory leaves the lock in place."""
    return directory.parent / f".{directory.name}.lock"


# --- locking -----------------------------------------------------------------------------------------------


class _ReadWriteLock:
    """Many readers or one writer, in one process. A waiting writer holds back new readers, so searches cannot
    starve the index's updates. Waits are bounded: past `timeout` seconds StoreBusy is raised.

    Not reentrant: public methods take it once and call private helpers that assume it is held.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)  # readers enter `with self._mutex`: one C call, no frame
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._reading = _ReadSide(self)

    def read(self) -> _ReadSide:
        """`with lock.read():` holds a read lock for the block (one shared object: it keeps no state per use)."""
        return self._reading

    def _wait(self, blocked: Callable[[], bool]) -> None:
        """Wait on the condition (mutex held) while blocked(), at most timeout seconds."""
        deadline = None
        while blocked():
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreBusy(
                    f"the collection stayed busy with a write for more than {self.timeout:g}s (VLSEARCH_LOCK_TIMEOUT)"
                )
            self._cond.wait(left)

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._wait(lambda: self._writing or bool(self._readers))
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _ReadSide:
    """The read side of a _ReadWriteLock as a plain context manager, taken once by every search: cheaper than
    a generator-based one."""

    def __init__(self, lock: _ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        with lock._mutex:
            if lock._writing or lock._writers_waiting:
                lock._wait(lambda: lock._writing or bool(lock._writers_waiting))
            lock._readers += 1

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        lock = self._lock
        with lock._mutex:
            lock._readers -= 1
            if not lock._readers and lock._writers_waiting:  # only writers wait for the readers to leave
                lock._cond.notify_all()


# --- errors ------------------------------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def _store_errors(method: _F) -> _F:
    """SQLite's and the disk's errors as vlsearch errors naming the collection (never a raw sqlite3 error)."""

    @functools.wraps(method)
    def wrapper(self: FaissStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as error:
            raise self._sqlite_error(error) from error
        except sqlite3.DatabaseError as error:
            raise CollectionCorrupt(f"collection {self.name!r} ({self.directory}) cannot be read: {error}") from error

    return wrapper  # type: ignore[return-value]


# --- the store ---------------------------------------------------------------------------------------------

# Every FaissStore of this process, for the fork handler: a child reopens its own files and index, never sharing
# the parent's SQLite connections (SQLite forbids it) or locks (a parent thread may hold one at the fork).
_OPEN_STORES: weakref.WeakSet[FaissStore] = weakref.WeakSet()
# The parent's PayloadDBs, kept referenced in a child so that they are never closed (or checkpointed) there.
_ABANDONED_IN_CHILD: list[PayloadDB] = []


def _after_fork_in_child() -> None:
    for store in list(_OPEN_STORES):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class FaissStore:
    """A collection in one directory: SQLite payloads and vectors, and a FAISS index (flat, hnsw or ivfpq).

    Thread-safe, and safe to share with other processes: searches and reads run concurrently; writes commit to
    SQLite (one writer at a time, across processes, each waiting at most lock_timeout) and then update this
    process's index; other processes' commits are caught up with before a search, by reading the change log.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        settings: IndexSettings,
        lock_timeout: float = 5.0,
        payload_cache_max_points: int = MIRROR_MAX_POINTS,
        maintain: bool = False,
    ) -> None:
        """Use `FaissStore.open`; this assumes the manifest is checked and the directory exists.

        maintain: train or rebuild the index now if it is due (a writer's open; readers never do).
        """
        self.directory = directory
        self.name = directory.name
        self.manifest = manifest
        self.settings = settings
        self.lock_timeout = lock_timeout
        self._cache_max_points = payload_cache_max_points
        self._closed = False
        self._pid = os.getpid()
        self._reopen_lock = threading.Lock()
        self._needs_reopen = False
        self._lock = _ReadWriteLock(lock_timeout)
        self._write_mutex = threading.Lock()  # this process's writers, one at a time
        self._open_files()
        if maintain:
            with self._lock.write():
                self._maintain_index()
        _OPEN_STORES.add(self)

    def _open_files(self) -> None:
        """Open SQLite and load the index (the constructor's work, again in a forked child)."""
        try:
            self._db = PayloadDB(
                self.directory / PAYLOADS_FILE, self.manifest.dim, self.lock_timeout, self._cache_max_points
            )
        except sqlite3.OperationalError as error:
            raise self._sqlite_error(error) from error
        # Where the index stands against SQLite: the generation, the change log's last row and next_fid it mirrors.
        self._generation = -1
        self._seq = 0
        self._next_fid = 0
        self._unsaved = False  # this process changed the index since it was last saved (only writers save)
        self._file_is_stale = False  # the index file on disk lags SQLite (a writer's next save rewrites it)
        self._loaded_meta: dict[str, Any] = {}
        self._merger: threading.Thread | None = None
        try:
            _remove_abandoned_temp_files(self.directory)
            self._index = self._load_index()
        except sqlite3.OperationalError as error:
            self._db.close()
            raise self._sqlite_error(error) from error
        except BaseException:
            self._db.close()
            raise

    def _forked(self) -> None:
        """In a forked child: leave the parent's connections and locks alone; reopen on first use."""
        _ABANDONED_IN_CHILD.append(self._db)
        self._reopen_lock = threading.Lock()
        self._lock = _ReadWriteLock(self.lock_timeout)
        self._write_mutex = threading.Lock()
        self._needs_reopen = not self._closed

    def _sqlite_error(self, error: sqlite3.OperationalError) -> Exception:
        text = str(error)
        where = f"collection {self.name!r} ({self.directory})"
        if getattr(error, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in text:
            return _storage_full(where, text)
        if "locked" in text or "busy" in text:
            return StoreBusy(
                f"{where} stayed locked by another process's write for more than {self.lock_timeout:g}s "
                f"(VLSEARCH_LOCK_TIMEOUT): {text}"
            )
        return StoreUnavailable(f"{where} cannot be used: {text}")

    @classmethod
    def open(
        cls,
        directory: Path,
        manifest: Manifest | None = None,
        *,
        hnsw_m: int = 32,
        hnsw_ef_search: int | None = None,
        hnsw_ef_construction: int = 80,
        ivf_nlist: int | None = None,
        pq_m: int = 32,
        ivf_nprobe: int = 16,
        lock_timeout: float = 5.0,
        payload_cache_max_points: int = MIRROR_MAX_POINTS,
        faiss_device: str = "cpu",
    ) -> FaissStore:
        """Open the collection in `directory`, or create it with `manifest` when it does not exist.

        Creating is safe when several processes do it at once: under a lock file beside the directory, the first
        creates and the others open what it made. An existing collection opened with another encoder, weights or
        dim raises EncoderMismatch; with another index_type, its index is rebuilt as that type. Missing without
        a manifest: CollectionNotFound. A writer's open (with a manifest) trains or rebuilds an index that is due.
        """
        directory = Path(directory)
        device = resolve_faiss_device(faiss_device)  # auto: the GPU where faiss has one (VLSEARCH_FAISS_DEVICE)
        settings = IndexSettings(hnsw_m, hnsw_ef_search, ivf_nlist, ivf_nprobe, pq_m, hnsw_ef_construction, device)
        options: dict[str, Any] = {"lock_timeout": lock_timeout, "payload_cache_max_points": payload_cache_max_points}
        manifest_path = directory / MANIFEST_FILE
        if manifest is None:
            stored = _read_manifest(directory)
            settings.check(stored)
            return cls(directory, stored, settings, **options)
        settings.check(manifest)
        if manifest_path.exists():
            stored = _read_manifest(directory)
            _check_same_encoder(directory, stored, manifest)
            if manifest.index_type == stored.index_type:
                return cls(directory, stored, settings, maintain=True, **options)
        with _file_lock(_creation_lock_path(directory), lock_timeout, f"creating collection {directory.name!r}"):
            if not manifest_path.exists():
                store: FaissStore | None = None
                try:
                    directory.mkdir(parents=True, exist_ok=True)
                    _remove_collection_files(directory)  # left by a creation or a drop that did not finish
                    store = cls(directory, manifest, settings, **options)
                    # written last: a directory without a manifest is a creation that did not finish
                    _write_text_atomically(manifest_path, manifest.to_json())
                except OSError as error:
                    if store is not None:
                        store.close()
                    if _is_disk_full(error):
                        raise _storage_full(f"the new collection {directory.name!r} ({directory})", error) from error
                    raise
                return store
            stored = _read_manifest(directory)
            _check_same_encoder(directory, stored, manifest)
            if manifest.index_type != stored.index_type:
                stored = replace(stored, index_type=manifest.index_type)
                settings.check(stored)
                _write_text_atomically(manifest_path, stored.to_json())
        return cls(directory, stored, settings, maintain=True, **options)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> FaissStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CollectionClosed(f"collection {self.name!r} ({self.directory}) is closed")
        if self._needs_reopen:
            with self._reopen_lock:
                if self._needs_reopen:  # a forked child's first use: its own connections and index
                    self._pid = os.getpid()
                    self._open_files()
                    self._needs_reopen = False

    @_store_errors
    def save(self) -> bool:
        """Make every change durable: checkpoint SQLite, then (where this process changed the index) replace
        index.faiss and index.json atomically. True when the checkpoint completed; False when other processes'
        readers or writer held part of it back (every commit is durable in the WAL all the same).

        A crash at any point leaves a loadable collection (see the module docstring). Raises SaveFailed when the
        disk refuses the index file.
        """
        self._check_open()
        with self._write_mutex:
            with self._lock.write():
                self._maintain_index()
            with self._lock.read():  # searches go on while the index is written
                return self._save()

    def _save(self) -> bool:
        completed = self._db.checkpoint()
        if not (self._unsaved or self._file_is_stale):
            return completed
        index = self._index
        meta = {
            "generation": self._generation,
            "seq": self._seq,
            "kind": index.kind,
            "trained_on": index.trained_on if isinstance(index, _IvfPqIndex) else 0,
            "tombstones": index.tombstones,
        }

        def write_index(tmp: Path) -> None:
            faiss.write_index(index.index, str(tmp))
            meta["index_file"] = _file_identity(tmp)  # a rename keeps it: the meta names the index it describes

        try:
            # Several processes may save one collection: one at a time, so index.faiss and index.json agree.
            with _file_lock(self.directory / SAVE_LOCK_FILE, self.lock_timeout, f"saving {self.name!r}"):
                _write_atomically(self.directory / INDEX_FILE, write_index)
                _write_text_atomically(self.directory / INDEX_META_FILE, json.dumps(meta))
        except (OSError, RuntimeError) as error:  # faiss reports a failed write as a RuntimeError naming errno
            what = f"the index of collection {self.name!r} ({self.directory})"
            if _is_disk_full(error):  # faiss's message is a page of C++: errno's words say it
                raise _storage_full(what, os.strerror(errno.ENOSPC)) from error
            raise SaveFailed(
                f"{what} could not be written: {error}; nothing committed is lost (SQLite holds it), the index is "
                "rebuilt from it on the next open"
            ) from error
        self._unsaved = self._file_is_stale = False
        return completed

    @_store_errors
    def close(self) -> None:
        """Release the collection, saving the index first where this process changed it; closing twice is
        harmless. A process that only searched writes nothing. A save that fails (a full disk) is raised once the
        files are closed: nothing committed is lost."""
        if self._closed:
            return
        if self._needs_reopen:  # a forked child that never used it: the parent's files are not ours to touch
            self._closed = True
            _OPEN_STORES.discard(self)
            return
        with self._write_mutex, self._lock.write():
            if self._closed:
                return
            try:
                if self._unsaved:
                    self._save()
            finally:
                self._db.close()
                self._closed = True
                _OPEN_STORES.discard(self)

    def drop(self) -> None:
        """Delete the collection's files from disk (and the directory when nothing else is left in it)."""
        creation = _file_lock(_creation_lock_path(self.directory), self.lock_timeout, f"dropping {self.name!r}")
        with creation, self._lock.write():
            if not self._closed:
                if not self._needs_reopen:
                    self._db.close()
                self._closed = True
                _OPEN_STORES.discard(self)
            _remove_collection_files(self.directory)
            (self.directory / SAVE_LOCK_FILE).unlink(missing_ok=True)
            if self.directory.exists() and not any(self.directory.iterdir()):
                self.directory.rmdir()

    # --- the index cache -----------------------------------------------------------------------------------

    def _empty_index(self) -> _FaissIndex:
        if self.manifest.index_type == "hnsw":
            return _HnswIndex.empty(self.manifest.dim, self.settings)
        return _FlatIndex.empty(self.manifest.dim, self.settings.device)  # ivfpq: exact until trained

    def _read_index_file(self) -> tuple[_FaissIndex | None, dict[str, Any]]:
        """The saved index as the manifest's kind (None when missing, unreadable or of another kind) and its meta,
        or {} for a meta that is not this index file's: a save killed between replacing index.faiss and replacing
        index.json leaves the new index with the old meta, whose IVF-PQ training size would be wrong for it."""
        path = self.directory / INDEX_FILE
        identity = _file_identity(path)
        meta = _read_json(self.directory / INDEX_META_FILE)
        try:
            loaded = faiss.read_index(str(path))
        except RuntimeError:
            return None, meta  # missing or unreadable: rebuilt from SQLite
        # another process's save may replace both files while they are read: then neither is trusted as a pair
        if _file_identity(path) != identity or meta.get("index_file", identity) != identity:
            meta = {}  # stale (rewritten by the next writer's save); IVF-PQ's training size taken from the index
        return _wrap_loaded(loaded, self.manifest, self.settings, int(meta.get("trained_on", 0))), meta

    def _load_index(self) -> _FaissIndex:
        """The index from disk made to match SQLite (or rebuilt). Once per open: a full reconcile by fid sets,
        which is right whatever the file's age; after it, catch-ups read only the change log."""
        index, meta = self._read_index_file()
        from_disk = index is not None
        if index is None:
            index = self._empty_index()
        changed = self._reconcile(index)
        self._file_is_stale = changed or not from_disk or meta.get("generation") != self._generation
        self._loaded_meta = meta
        return index

    def _reconcile(self, index: _FaissIndex) -> bool:
        """Add the SQLite vectors the index lacks, drop the fids SQLite no longer has; record the sync point.
        Whether the index changed.

        One read transaction: the sync point, the fids and their vectors come from one snapshot, so a point
        deleted meanwhile (by another process) is neither asked for nor half added; a later catch-up sees it.
        """
        with self._db.read_transaction():
            point = self._db.sync_point()
            live = self._db.matching_fids(None)
            entries = np.sort(index.entries())
            dead = np.setdiff1d(entries, live, assume_unique=True)
            missing = np.setdiff1d(live, entries, assume_unique=True)
            if len(dead):
                index.remove(dead)
            for start in range(0, len(missing), 65536):
                fids = missing[start : start + 65536]
                index.add(fids, self._db.vectors(fids))
        self._generation, self._seq, self._next_fid = point.generation, point.seq, point.next_fid
        return bool(len(dead) or len(missing))

    def _rebuild(self, index: _FaissIndex) -> _FaissIndex:
        for fids, vectors in self._db.iter_vectors():
            index.add(fids, vectors)
        return index

    def _train_ivfpq(self) -> _IvfPqIndex:
        fids = self._db.matching_fids(None)
        nlist = self.settings.nlist_for(len(fids))
        rng = np.random.default_rng(0)  # a seeded sample: the same data trains the same index
        sample = np.sort(rng.choice(fids, size=min(len(fids), IVF_TRAIN_SAMPLE), replace=False))
        index: Any = faiss.index_factory(  # an IndexIVFPQ, typed as a plain Index by faiss's stubs
            self.manifest.dim, f"IVF{nlist},PQ{self.settings.pq_m}x8", faiss.METRIC_INNER_PRODUCT
        )
        # on by default, unused by our searches, and 500x the training time
        index.do_polysemous_training = False
        train_ivf(index, self._db.vectors(sample), self.settings.device)
        trained = _IvfPqIndex(index, self.settings.ivf_nprobe, trained_on=len(fids))
        self._rebuild(trained)
        return trained

    def _maintain_index(self) -> None:
        """Train or retrain IVF-PQ as the collection grows; rebuild an HNSW graph full of tombstones.

        Writers only (after their own writes, on save, on a writer's open): never inside a search. The rebuilt
        index is made from one snapshot and then caught up, so it mirrors SQLite like the one it replaces.
        """
        index = self._index
        index.merge_pending()  # a writer's index holds everything in its main structure before it is saved
        if self.manifest.index_type == "ivfpq":
            count = index.live  # the index mirrors SQLite here
            if isinstance(index, _IvfPqIndex):
                due = count >= IVF_RETRAIN_GROWTH * max(1, index.trained_on)
            else:
                due = self.settings.ivf_trainable(count)
            if not due:
                return
            with self._db.read_transaction():
                point = self._db.sync_point()
                rebuilt: _FaissIndex = self._train_ivfpq()
        elif index.needs_rebuild():
            with self._db.read_transaction():
                point = self._db.sync_point()
                rebuilt = self._rebuild(self._empty_index())
        else:
            return
        self._index, self._unsaved = rebuilt, True
        self._generation, self._seq, self._next_fid = point.generation, point.seq, point.next_fid
        self._catch_up()

    def _apply(self, changes: VectorChanges) -> None:
        """Make the index follow a committed SQLite change of this process (the RW write lock is held)."""
        if changes.seq_before != self._seq:
            self._catch_up()  # another connection committed too: the change log has both, in order
        else:
            self._seq = changes.seq_after
            if not changes.is_empty():
                self._unsaved = True
                try:
                    if len(changes.removed_fids):
                        self._index.remove(changes.removed_fids)
                    if len(changes.added_fids):
                        self._index.add(changes.added_fids, changes.added_vectors)
                except BaseException:
                    self._index = self._empty_index()  # the cache can always be rebuilt from SQLite
                    self._reconcile(self._index)
                    raise
                self._generation = changes.generation
            self._next_fid = max(self._next_fid, changes.next_fid)
        self._maintain_index()

    def _catch_up(self) -> None:
        """Bring the index up to date with commits made through other connections (other processes), in
        proportion to what they changed: the change log names the fids (see PayloadDB.index_delta). An index older
        than the log reaches back is reconciled in full, as on open."""
        delta = self._db.index_delta(self._seq, self._next_fid)
        if delta is None:
            self._reconcile(self._index)
            return
        if not delta.is_empty():
            if len(delta.removed_fids):
                self._index.remove(delta.removed_fids)
            if len(delta.added_fids):
                self._index.add_later(delta.added_fids, delta.added_vectors)
                if self._index.pending >= HNSW_MERGE_AT and self._merger is None:
                    self._merger = threading.Thread(target=self._merge_pending, name=f"merge-{self.name}", daemon=True)
                    self._merger.start()
        now = delta.now
        self._generation, self._seq, self._next_fid = now.generation, now.seq, max(self._next_fid, now.next_fid)

    def _merge_pending(self) -> None:
        """The background thread that inserts pending vectors into the HNSW graph, a batch per hold of the write
        lock, so that searches wait for one batch at most; it ends when none is left (or the store closes)."""
        while True:
            try:
                with self._lock.write():
                    if self._closed or self._needs_reopen or not self._index.merge_pending(HNSW_MERGE_BATCH):
                        self._merger = None
                        return
            except StoreBusy:
                pass  # a long write of this process: try again
            time.sleep(0.001)  # searches that waited run first

    def _ensure_current(self) -> None:
        """Catch up with other processes' writes before a search; no query while nothing has committed."""
        with self._lock.read():
            self._check_open()
            current = self._db.current_generation() == self._generation
        if not current:
            with self._lock.write():
                self._check_open()
                self._catch_up()

    @_store_errors
    def index_info(self) -> IndexInfo:
        """The index kind, its live and dead entries, and its size on disk."""
        self._ensure_current()
        with self._lock.read():
            self._check_open()
            path = self.directory / INDEX_FILE
            index = self._index
            return IndexInfo(
                kind=index.kind,
                indexed=index.live,
                tombstones=index.tombstones,
                trained_on=index.trained_on if isinstance(index, _IvfPqIndex) else 0,
                file_bytes=path.stat().st_size if path.exists() else None,
            )

    # --- writes --------------------------------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.manifest.dim:
            raise EncoderMismatch(
                f"vectors of shape {array.shape} cannot go into collection {self.name!r} ({self.directory}), "
                f"which holds dim {self.manifest.dim} vectors from {self.manifest.encoder!r} "
                f"(weights {self.manifest.weights})"
            )
        if not np.isfinite(array).all():
            raise InvalidQuery(f"vectors for collection {self.name!r} contain NaN or infinite values")
        return np.ascontiguousarray(array)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's writers one at a time (bounded wait); searches go on meanwhile."""
        self._check_open()
        if not self._write_mutex.acquire(timeout=self.lock_timeout):
            raise StoreBusy(
                f"collection {self.name!r} stayed busy with another write of this process for more than "
                f"{self.lock_timeout:g}s (VLSEARCH_LOCK_TIMEOUT)"
            )
        try:
            self._check_open()
            yield
        finally:
            self._write_mutex.release()

    def _follow(self, seqs: tuple[int, int]) -> None:
        """After a payload-only commit: the index has nothing to do; keep the sync point moving when no other
        commit came between (the log is pruned, and a reader it no longer reaches reconciles in full)."""
        with self._lock.write():
            if seqs[0] == self._seq:
                self._seq = seqs[1]

    @_store_errors
    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload], merge_existing: bool = False
    ) -> None:
        """Insert or overwrite points (one SQLite transaction, one index add); vectors are (len(ids), dim).
        merge_existing: ids stored already keep their vector and payload, merged with the new (merged_payload)."""
        array = self._check_vectors(vectors)
        if not len(ids) == len(array) == len(payloads):
            raise InvalidQuery(f"upsert got {len(ids)} ids, {len(array)} vectors and {len(payloads)} payloads")
        if not len(ids):
            return
        with self._writing():
            changes = self._db.upsert(ids, array, payloads, merge_existing)
            with self._lock.write():
                self._apply(changes)

    @_store_errors
    def set_payload(self, id: str, payload: Payload) -> None:
        """Replace one point's payload, keeping its vector; PointNotFound when the id does not exist.

        Only for a payload built whole by the caller: to change fields, use update_payloads."""
        with self._writing():
            seqs = self._db.set_payload(id, payload)
            if seqs is None:
                raise PointNotFound(f"no image with id {id!r} in collection {self.name!r} ({self.directory})")
            self._follow(seqs)

    @_store_errors
    def update_payloads(self, updates: Mapping[str, PayloadUpdate]) -> dict[str, Payload]:
        """Apply each id's update to its payload as stored at commit time, all in one transaction; the new
        payloads of the ids that exist (missing ids are left out). Concurrent updates of other fields, or of
        other values of a list, from any process, are all kept."""
        if not updates:
            return {}
        with self._writing():
            payloads, seqs = self._db.update_payloads(updates)
            self._follow(seqs)
        return payloads

    @_store_errors
    def ids_by_path(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> id of the stored image holding it, for the paths some image holds (an index look-up)."""
        with self._lock.read():
            self._check_open()
            return self._db.ids_by_path(paths)

    @_store_errors
    def delete(self, ids: Sequence[str], only_if_empty: Sequence[str] = ()) -> int:
        """Delete points; returns how many were deleted. only_if_empty: only those whose payload fields of these
        names are missing, null or empty when the delete commits."""
        with self._writing():
            changes = self._db.delete(ids, only_if_empty)
            with self._lock.write():
                self._apply(changes)
            return len(changes.removed_fids)


    # --- reads ---------------------------------------------------------------------------------------------

    @_store_errors
    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Record]:
        """The points that exist among ids, in the order asked."""
        with self._lock.read():
            self._check_open()
            return self._db.get(ids, with_vectors)

    @_store_errors
    def count(self, filter: Filter | None = None) -> int:
        """How many points match filter (all points for None)."""
        with self._lock.read():
            self._check_open()
            return self._db.count(filter)

    @_store_errors
    def scroll(
        self, filter: Filter | None = None, batch_size: int = 1000, with_vectors: bool = False
    ) -> Iterator[Record]:
        """Every matching point exactly once, ordered by id, read in batches of batch_size."""
        if batch_size < 1:
            raise InvalidQuery(f"scroll batch_size must be at least 1, got {batch_size}")
        return self._scroll(filter, batch_size, with_vectors)

    def _scroll(self, filter: Filter | None, batch_size: int, with_vectors: bool) -> Iterator[Record]:
        after: str | None = None
        while True:
            with self._lock.read():  # per batch, so a long scroll does not hold writers back
                self._check_open()
                try:
                    batch = self._db.page(filter, after, batch_size, with_vectors)
                except sqlite3.OperationalError as error:
                    raise self._sqlite_error(error) from error
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1].id

    def _check_query(self, vector: np.ndarray) -> np.ndarray:
        query = checked_query_vector(vector, self.manifest, f"{self.name!r} ({self.directory})")
        return np.ascontiguousarray(query.reshape(1, -1))

    @_store_errors
    def search(
        self,
        vector: np.ndarray,
        k: int,
        filter: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[Hit]:
        """Hits offset..offset+k by descending inner product (ties by id), within filter and min_score."""
        query = self._check_query(vector)
        check_page(k, offset)
        need = offset + k
        caught_up = False
        while True:
            with self._lock.read():
                self._check_open()
                # other processes' writes are caught up with first (as in _ensure_current), checked under the
                # search's own read lock, and without a query while nothing has committed
                if caught_up or self._db.current_generation() == self._generation:
                    ranked = self._search_locked(query, need, filter)
                    break
            with self._lock.write():
                self._check_open()
                self._catch_up()
            caught_up = True
        page = ranked[offset:need]
        if min_score is not None:
            page = [hit for hit in page if hit[0] >= min_score]
        payloads = _decode_payloads([text for _, _, text in page])
        return [
            Hit(id=point_id, score=score, payload=payload)
            for (score, point_id, _), payload in zip(page, payloads, strict=True)
        ]

    def _search_locked(self, query: np.ndarray, need: int, filter: Filter | None) -> list[tuple[float, str, str]]:
        """The best `need` hits as (score, id, payload JSON); the caller holds the read lock."""
        allowed = None if filter is None or filter.is_empty() else self._db.matching_fids(filter)
        if allowed is not None:
            # SQLite may be ahead of the index (a commit whose index update is on its way): points committed
            # after the index's sync point are found from the next search on, when it has caught up
            allowed = allowed[allowed < self._next_fid]
            if not len(allowed):
                return []
            if self._scan_is_better(len(allowed)):
                return self._rank(*self._exact_scores(query, allowed), need)
        selector, bitmap = self._selector(allowed)
        ranked = self._narrow_top(query, need, selector)
        if ranked is None:
            ranked = self._rank(*self._index_candidates(query, need, selector), need)
        del bitmap  # kept alive until here: the selector points into it
        return ranked

    @_store_errors
    def keyword_search(self, text: str, k: int, filter: Filter | None = None, offset: int = 0) -> list[Hit]:
        """Hits offset..offset+k holding any word of text (paths, tags, captions) by descending BM25, ties by id."""
        check_page(k, offset)
        terms = query_terms(text)
        if not terms:
            return []
        with self._lock.read():
            self._check_open()
            documents, words, containing = self._db.text_statistics(terms)
            matches = self._db.text_matches(terms, filter)
            if not matches:
                return []
            weights = {term: idf(documents, containing[term]) for term in terms}
            average = words / documents
            # rounded to float32 as Qdrant reports BM25, so equal documents tie on either store
            scored = (
                (-float(np.float32(bm25(body.split(" "), weights, average))), point_id, fid)
                for fid, point_id, body in matches
            )
            ranked = heapq.nsmallest(offset + k, scored)[offset:]
            points = self._db.ids_and_payloads([fid for _, _, fid in ranked])
        return [Hit(id=point_id, score=-score, payload=json.loads(points[fid][1])) for score, point_id, fid in ranked]

    def _scan_is_better(self, matches: int) -> bool:
        if isinstance(self._index, _FlatIndex):
            return False  # the flat index with a selector is already an exact scan, without reading SQLite
        return matches <= max(EXACT_SEARCH_ROWS, EXACT_SEARCH_SHARE * self._index.live)

    def _exact_scores(self, query: np.ndarray, fids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fids, exact scores) of those of fids that still exist."""
        if self._index.stores_vectors:
            return fids, _inner_products(self._index.vectors(fids), query[0])
        present, vectors = self._db.present_vectors(fids)  # deleted meanwhile by another connection: left out
        return present, _inner_products(vectors, query[0])

    def _selector(self, allowed: np.ndarray | None) -> tuple[Any | None, np.ndarray | None]:
        """The IDSelector of a search within allowed (the index's default for None), and the bitmap it points
        into, which must outlive the search."""
        if allowed is None:
            return self._index.default_selector(), None
        # IDSelectorBitmap does not check bounds: the bitmap must cover every fid the index may hold
        members = np.zeros(self._db.next_fid, dtype=bool)
        members[allowed] = True
        bitmap = np.packbits(members, bitorder="little")
        # swig_ptr: the stubs say an array, but this faiss build wants a pointer
        return faiss.IDSelectorBitmap(len(members), faiss.swig_ptr(bitmap)), bitmap  # type: ignore[arg-type]

    def _narrow_top(self, query: np.ndarray, need: int, selector: Any | None) -> list[tuple[float, str, str]] | None:
        """What `_rank(*_index_candidates(...))` returns, from the index's narrow pool when that decides it.

        Decisive when fewer than the pool came back (every candidate is in hand) or when the last two differ
        in score (no tie across the cut): the best `need` of the pool are then the best `need` of the full
        pool (see _HnswIndex.narrow_pool), which _rank orders by score, then id. Else None. On lists from the
        search on: for a dozen candidates, numpy calls cost more than they save.
        """
        narrow = self._index.narrow_pool(need)
        if narrow is None:
            return None
        scores, fids = self._index.search(query, narrow, selector)
        fid_list, score_list = fids.tolist(), scores.tolist()  # best first; the missing (-1) last
        if fid_list[-1] < 0:
            end = fid_list.index(-1)
        elif score_list[need - 1] > score_list[need]:
            end = need  # what _rank keeps of the pool
        else:
            return None
        del fid_list[end:], score_list[end:]
        return self._ranked(fid_list, score_list, need, best_first=True)

    def _index_candidates(self, query: np.ndarray, need: int, selector: Any | None) -> tuple[np.ndarray, np.ndarray]:
        """(fids, scores) of the index's candidates for the top `need` within selector, with exact scores."""
        if not self._index.live:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        n = self._index.pool_size(need)
        while True:
            scores, fids = self._index.search(query, n, selector)
            found = fids >= 0
            scores, fids = scores[found], fids[found]
            # an exact index cut inside a run of equal scores: ask for more, so ties go by id, not by fid
            if not (self._index.complete and len(fids) == n and need < n and scores[need - 1] == scores[-1]):
                break
            n *= 2
        if not self._index.stores_vectors:
            return self._exact_scores(query, fids)  # PQ scores are approximate
        return fids, scores

    def _rank(self, fids: np.ndarray, scores: np.ndarray, need: int) -> list[tuple[float, str, str]]:
        """The best `need` of the candidates as (score, id, payload JSON), by descending score then id."""
        if len(fids) > need:
            cut = np.partition(scores, len(scores) - need)[len(scores) - need]
            keep = scores >= cut  # everything tied with the cut stays, to be ordered by id
            fids, scores = fids[keep], scores[keep]
        return self._ranked(fids.tolist(), scores.tolist(), need)

    def _ranked(
        self, fids: list[int], scores: list[float], need: int, best_first: bool = False
    ) -> list[tuple[float, str, str]]:
        """The points of fids that exist as (score, id, payload JSON), by descending score then id, `need` at most.

        best_first: the scores already descend (as a search returns them), so only ties need sorting.
        """
        points = self._db.ids_and_payloads(fids)
        ranked = [(score, *points[fid]) for fid, score in zip(fids, scores, strict=True) if fid in points]
        if not best_first or len(set(scores)) < len(scores):
            ranked.sort(key=itemgetter(1))  # by id, then (stably) by descending score: ties stay ordered by id
            ranked.sort(key=itemgetter(0), reverse=True)
        return ranked[:need]


_JSON_DECODER = json.JSONDecoder()


def _decode_payloads(texts: list[str]) -> list[Payload]:
    """Decode stored payload JSON texts (objects, as encode_payload writes them) in one call.

    As json.loads of each; raw_decode skips the whitespace scans around the text, which starts with '['.
    """
    if not texts:
        return []
    payloads: list[Payload] = _JSON_DECODER.raw_decode("[" + ",".join(texts) + "]")[0]
    return payloads


def _inner_products(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Inner products of each row of vectors with query, as float32."""
    # summed in float64, then rounded: equal vectors score equal wherever BLAS blocks them; ties go by id
    return (vectors.astype(np.float64) @ query.astype(np.float64)).astype(np.float32)


def _read_manifest(directory: Path) -> Manifest:
    """The collection's manifest; CollectionNotFound when there is none, CollectionCorrupt when unreadable."""
    path = directory / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CollectionNotFound(
            f"no collection at {directory} (no {MANIFEST_FILE}); index images into it first"
        ) from None
    except OSError as error:
        raise CollectionCorrupt(f"{path} cannot be read: {error}") from error
    try:
        return Manifest.from_json(text)
    except (ValueError, TypeError) as error:
        raise CollectionCorrupt(f"{path} cannot be read: {error}") from error


def _check_same_encoder(directory: Path, stored: Manifest, asked: Manifest) -> None:
    if (asked.encoder, asked.weights, asked.dim) != (stored.encoder, stored.weights, stored.dim):
        raise EncoderMismatch(
            f"collection at {directory} was built with encoder {stored.encoder!r} (weights {stored.weights}, "
            f"dim {stored.dim}); it was opened for {asked.encoder!r} (weights {asked.weights}, "
            f"dim {asked.dim}). "
            "Use the model that built it, or index into a new collection."
        )
