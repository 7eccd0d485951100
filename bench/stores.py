"""Vector stores side by side: build time, memory per vector, queries/s and recall@10, and the store's overhead.

    .venv/bin/python -m bench.stores [--sizes 200000 1000000] [--queries 200] [--isotropic-size 100000]
        [--kinds flat hnsw ivfpq qdrant]

By default every store runs at 200k, and at 1M FAISS flat and IVF-PQ: on a 2-core machine an HNSW build of 1M
would take the run far past 20 minutes, and Qdrant local mode (brute force in Python, about 17 KB of RAM a point)
cannot hold 1M. Isotropic data, for the record, goes to the approximate indexes only: flat FAISS and Qdrant local
search exactly, so their recall is 1 and their cost the same on any data.

Data: seeded unit vectors of dimension 512 from bench/synthetic_vectors.py, shaped like CLIP embeddings
(`embedding_like`, base and queries drawn in one call) and, for the record, isotropic (the worst case for ANN).
Each configuration is built through the store itself (SQLite, the FTS index and the FAISS index; for Qdrant, embedded
local mode), with ids like content hashes and a file path per point, in upserts of 10,000, then saved.

Columns: build s (upserts + save); index B/vec (the FAISS index in memory = its serialised size, per vector; for
Qdrant local, the process RSS that opening the collection adds, per vector); disk B/vec (the collection directory);
q/s (one query at a time through `store.search(k=10)`, one thread); recall@10 (against exact inner-product search).
search/bare: time of `store.search` over the bare faiss call on the same index with the same parameters (k=10,
efSearch, nprobe), one thread, on 400 queries the store has not seen (its payloads are read cold, from SQLite);
bare recall: that call's recall@10 (the store re-scores IVF-PQ candidates exactly). --ef-search: the HNSW index is
also reopened and searched with each of these efSearch values, a row each (efSearch column). 1st s, 1st B/vec: the
first search after reopening the store, which for FAISS reads every id and payload into memory, and the resident
memory it adds per vector (not in q/s).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.shared_collection import CatchUp, catch_up, concurrent_indexing, searching_process_memory
from bench.synthetic_vectors import embedding_like, isotropic
from retriever.faiss_store import FaissStore
from retriever.payload_db import MIRROR_MAX_POINTS
from retriever.qdrant_store import QdrantStore
from retriever.store import Manifest, VectorStore

DIM = 512
K = 10
UPSERT_BATCH = 10_000
OVERHEAD_QUERIES = 400  # fresh ones, searched once each: every hit is read from SQLite, not from a cache
KINDS = ("flat", "hnsw", "ivfpq", "qdrant")


@dataclass
class Row:
    data: str
    n: int
    kind: str
    build_s: float
    index_bytes: float
    disk_bytes: float
    qps: float
    recall: float
    overhead: float | None = None
    bare_recall: float | None = None
    ef_search: int | None = None  # HNSW: the efSearch searched with
    first_search_s: float = 0.0  # the first search after opening: FAISS reads every id and payload into memory
    first_search_bytes: float = 0.0  # what that first search adds to the process, per vector
    catch_up: CatchUp | None = None  # FAISS flat/HNSW: the first search after another process's commit
    process_bytes: float | None = None  # a new searching process: resident bytes added per point (open + search)
    process_bytes_uncached: float | None = None  # the same without the payload cache in memory
    overhead_uncached: float | None = None  # search/bare without the payload cache (hits read from SQLite)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc), so that RSS shows what is held."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def exact_top_k(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the exact top K of every query (inner product), with all cores."""
    index = faiss.IndexFlatIP(DIM)
    index.add(base)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, rows = index.search(queries, K)
    return rows


def point_ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]  # 32 hex digits like content hashes; row i has id i


def build(kind: str, directory: Path, base: np.ndarray) -> tuple[VectorStore, float]:
    manifest = Manifest(
        encoder="bench",
        weights="synthetic",
        dim=DIM,
        store="qdrant" if kind == "qdrant" else "faiss",
        index_type="flat" if kind == "qdrant" else kind,
    )
    ids = point_ids(len(base))
    started = time.perf_counter()
    store: VectorStore
    if kind == "qdrant":
        store = QdrantStore.open("bench", manifest, path=directory, batch_size=1000)
    else:
        store = FaissStore.open(directory / "bench", manifest)
    for start in range(0, len(base), UPSERT_BATCH):
        rows = slice(start, start + UPSERT_BATCH)
        store.upsert(ids[rows], base[rows], [{"paths": [f"/bench/{i:07d}.jpg"]} for i in range(start, rows.stop)])
    store.save()
    return store, time.perf_counter() - started


def first_search(store: VectorStore, query: np.ndarray, n: int) -> tuple[float, float]:
    """(seconds, resident bytes added per vector) of the first search after opening, which loads what searches
    keep in memory (the FAISS store: every point's id and payload)."""
    gc.collect()
    release_free_memory()
    before = rss_bytes()
    started = time.perf_counter()
    store.search(query, K)
    seconds = time.perf_counter() - started
    gc.collect()
    release_free_memory()
    return seconds, (rss_bytes() - before) / n


def query_rate_and_recall(store: VectorStore, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    faiss.omp_set_num_threads(1)  # one query at a time, as a service answers them
    found = []
    started = time.perf_counter()
    for query in queries:
        found.append([int(hit.id, 16) for hit in store.search(query, K)])
    seconds = time.perf_counter() - started
    recall = np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
    return len(queries) / seconds, float(recall)


def bare_search(store: FaissStore) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The faiss call the store makes, on the same index with the same parameters, for K results."""
    index = store._index.index  # the bench measures the store against its own index
    params: Any
    if store.manifest.index_type == "hnsw":
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        params.efSearch = store._index.ef_search  # type: ignore[attr-defined]  # an _HnswIndex here
    elif store.manifest.index_type == "ivfpq":
        params = faiss.SearchParametersIVF()
        params.nprobe = store.settings.ivf_nprobe
    else:
        params = faiss.SearchParameters()
    return lambda query: index.search(query[None, :], K, params=params)  # (scores, fids)


def overhead(store: FaissStore, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(time of store.search / time of the bare faiss call, recall@10 of the bare call), one thread.

    The two alternate query by query, each going first every other time: load on a shared machine hits both
    alike, and neither profits from the caches the other warmed more often than it warms them for the other.
    Each query runs once in each: queries the store has not seen, so its hits are read from SQLite (cold).
    """
    faiss.omp_set_num_threads(1)
    bare = bare_search(store)
    seconds = {"bare": 0.0, "store": 0.0}
    recalls = []
    for i, (query, rows) in enumerate(zip(queries, truth, strict=True)):
        for which in ("bare", "store") if i % 2 else ("store", "bare"):
            started = time.perf_counter()
            if which == "bare":
                _, fids = bare(query)
            else:
                store.search(query, K)
            seconds[which] += time.perf_counter() - started
        recalls.append(len(set(fids[0].tolist()) & set(rows.tolist())) / K)  # fid i is row i: inserted in order
    return seconds["store"] / seconds["bare"], float(np.mean(recalls))


def index_bytes(store: VectorStore, kind: str, n: int, opened_rss: int) -> float:
    if isinstance(store, FaissStore):
        return len(faiss.serialize_index(store._index.index)) / n
    return opened_rss / n


def measure(
    data: str,
    kind: str,
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    workdir: Path,
    ef_values: list[int],
    shared: bool = True,
) -> list[Row]:
    """The row of one store built from base, and for HNSW one more row per efSearch of ef_values.

    queries: OVERHEAD_QUERIES fresh ones for the overhead, after the ones for q/s and recall.
    """
    queries, fresh = queries[:-OVERHEAD_QUERIES], queries[-OVERHEAD_QUERIES:]
    truth, fresh_truth = truth[:-OVERHEAD_QUERIES], truth[-OVERHEAD_QUERIES:]
    n = len(base)
    directory = workdir / f"{data}-{kind}-{n}"
    directory.mkdir()
    log(f"{data} n={n} {kind}: building")
    store, build_s = build(kind, directory, base)
    opened_rss = 0
    if kind == "qdrant":  # its memory: what reopening the collection adds to this process
        store.close()
        gc.collect()
        release_free_memory()
        before = rss_bytes()
        store = QdrantStore.open("bench", None, path=directory)
        gc.collect()
        release_free_memory()  # loading unpickles every point through Python lists: count what stays, not the peak
        opened_rss = rss_bytes() - before
    log(f"{data} n={n} {kind}: built in {build_s:.1f}s; querying")
    if isinstance(store, FaissStore):  # reopened (as Qdrant was): the first search as a new service makes it
        store.close()
        store = FaissStore.open(directory / "bench")
    opening = first_search(store, queries[0], n)
    qps, recall = query_rate_and_recall(store, queries, truth)
    disk = directory_bytes(directory) / n
    row = Row(data, n, kind, build_s, index_bytes(store, kind, n, opened_rss), disk, qps, recall)
    row.first_search_s, row.first_search_bytes = opening
    rows = [row]
    if isinstance(store, FaissStore):
        row.overhead, row.bare_recall = overhead(store, fresh, fresh_truth)
        if shared and kind in ("flat", "hnsw"):
            log(f"{data} n={n} {kind}: searches after another process's commits; memory of a searching process")
            store.save()
            row.process_bytes = searching_process_memory(directory / "bench", MIRROR_MAX_POINTS)
            row.process_bytes_uncached = searching_process_memory(directory / "bench", 0)
            store.close()  # the payload cache off: hits come from SQLite, as in the other processes' view
            store = FaissStore.open(directory / "bench", payload_cache_max_points=0)
            first_search(store, queries[0], n)
            row.overhead_uncached, _ = overhead(store, fresh, fresh_truth)
            store.close()
            store = FaissStore.open(directory / "bench")
            row.catch_up = catch_up(store, queries)  # commits land in the collection: measured last
        if kind == "hnsw":
            row.ef_search = store._index.ef_search  # type: ignore[attr-defined]
            for ef in ef_values:  # the saved index, reopened with another efSearch
                store.close()
                store = FaissStore.open(directory / "bench", hnsw_ef_search=ef)
                log(f"{data} n={n} {kind}: efSearch {ef}")
                first_search(store, queries[0], n)
                qps, recall = query_rate_and_recall(store, queries, truth)
                swept = Row(data, n, kind, build_s, row.index_bytes, disk, qps, recall, ef_search=ef)
                swept.overhead, swept.bare_recall = overhead(store, fresh, fresh_truth)
                rows.append(swept)
    store.close()
    del store
    gc.collect()
    shutil.rmtree(directory)
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        f"{'data':<10} {'n':>9} {'store':<12} {'build s':>8} {'index B/vec':>11} {'disk B/vec':>10} "
        f"{'q/s':>8} {'recall@10':>9} {'search/bare':>11} {'bare recall':>11} {'efSearch':>8} {'1st s':>6} "
        f"{'1st B/vec':>9}"
    )
    for row in rows:
        name = "qdrant-local" if row.kind == "qdrant" else f"faiss-{row.kind}"
        ef = str(row.ef_search) if row.ef_search is not None else "-"
        ratio = f"{row.overhead:.2f}x" if row.overhead is not None else "-"
        bare = f"{row.bare_recall:.3f}" if row.bare_recall is not None else "-"
        print(
            f"{row.data:<10} {row.n:>9} {name:<12} {row.build_s:>8.1f} {row.index_bytes:>11.0f} "
            f"{row.disk_bytes:>10.0f} {row.qps:>8.1f} {row.recall:>9.3f} {ratio:>11} {bare:>11} {ef:>8} "
            f"{row.first_search_s:>6.2f} {row.first_search_bytes:>9.0f}"
        )


def print_shared_table(rows: list[Row]) -> None:
    print(
        f"{'data':<10} {'n':>9} {'store':<12} {'after commit ms':>15} {'warm ms':>8} {'ratio':>6} "
        f"{'process B/pt':>12} {'no cache B/pt':>13} {'search/bare':>11} {'no cache':>9}"
    )
    for row in rows:
        if row.catch_up is None:
            continue
        print(
            f"{row.data:<10} {row.n:>9} {'faiss-' + row.kind:<12} {row.catch_up.first_ms:>15.2f} "
            f"{row.catch_up.warm_ms:>8.2f} {row.catch_up.ratio:>5.2f}x {row.process_bytes or 0:>12.0f} "
            f"{row.process_bytes_uncached or 0:>13.0f} {row.overhead or 0:>10.2f}x {row.overhead_uncached or 0:>8.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--all-kinds-up-to", type=int, default=200_000, help="larger sizes run --large-kinds only")
    parser.add_argument("--large-kinds", nargs="*", default=["flat", "ivfpq"], choices=KINDS)
    parser.add_argument("--isotropic-size", type=int, default=100_000, help="0 to leave isotropic data out")
    parser.add_argument("--isotropic-kinds", nargs="*", default=["hnsw", "ivfpq"], choices=KINDS)
    parser.add_argument("--workdir", type=Path, default=None, help="where collections are built (default: a temp dir)")
    parser.add_argument(
        "--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="run only these stores (default: all)"
    )
    parser.add_argument(
        "--ef-search", type=int, nargs="*", default=[], help="HNSW: also search the built index with these efSearch"
    )
    parser.add_argument(
        "--indexing-points", type=int, default=100_000, help="two indexing processes against one (0: not run)"
    )
    parser.add_argument("--no-shared", action="store_true", help="leave out the many-processes measures")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__}, {args.queries} queries, k={K}, dim {DIM}")
    started = time.perf_counter()
    rows: list[Row] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as temp:
        workdir = Path(temp)
        largest = max(args.sizes)
        log(f"generating {largest} embedding-like vectors + {args.queries} + {OVERHEAD_QUERIES} queries")
        extra = args.queries + OVERHEAD_QUERIES
        vectors = embedding_like(largest + extra, dim=DIM, seed=0)  # base and queries in one draw
        plan: list[tuple[str, np.ndarray, np.ndarray, list[str]]] = []
        for n in sorted(args.sizes):
            kinds = [k for k in (KINDS if n <= args.all_kinds_up_to else args.large_kinds) if k in args.kinds]
            skipped += [f"embedding {kind}@{n}" for kind in KINDS if kind not in kinds]
            plan.append(("embedding", vectors[:n], vectors[largest:], kinds))
        iso_kinds = [k for k in args.isotropic_kinds if k in args.kinds]
        if args.isotropic_size and iso_kinds:
            iso = isotropic(args.isotropic_size + extra, DIM, seed=0)
            plan.append(("isotropic", iso[: args.isotropic_size], iso[args.isotropic_size :], iso_kinds))
        if args.isotropic_size:
            skipped += [f"isotropic {k}@{args.isotropic_size}" for k in KINDS if k not in iso_kinds]
        for data, base, queries, kinds in plan:
            log(f"{data} n={len(base)}: exact top-{K}")
            truth = exact_top_k(base, queries)
            for kind in kinds:
                measured = measure(data, kind, base, queries, truth, workdir, args.ef_search, not args.no_shared)
                rows += measured
                for row in measured:
                    log(f"  {row}")
        indexing = None
        if args.indexing_points and not args.no_shared:
            log(f"indexing {args.indexing_points} points: one process, then two at once")
            indexing = concurrent_indexing(workdir, args.indexing_points)
    print()
    print_table(rows)
    if not args.no_shared:
        print()
        print("many processes, one collection (bench/shared_collection.py):")
        print_shared_table(rows)
    if indexing is not None:
        print(
            f"indexing {args.indexing_points} points in chunks of 256 into a new collection: one process "
            f"{indexing['one_s']:.1f} s, two processes at once {indexing['two_s']:.1f} s "
            f"({indexing['one_s'] / indexing['two_s']:.2f}x the rate of one)"
        )
    if skipped:
        print(f"not run: {', '.join(skipped)}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
