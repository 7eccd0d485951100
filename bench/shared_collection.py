"""One FAISS collection shared by several processes: what another process's commit costs a searching one, what
a searching process holds in memory, and two indexing processes against one. Run by bench/stores.py in its one
run (the figures of BENCHMARKS.md); also on its own for a quick look:

    .venv/bin/python -m bench.shared_collection [--size 200000] [--index-type flat] [--indexing-points 100000]

- catch-up: a writer process commits 32 new points; the searching process's next search (which catches up
  with them: the change log's rows, 32 vectors added to its index, 32 payloads read into its copy) against its
  next search after that (warm), alternating, each on a query it has not seen; medians over the repetitions.
- memory: a fresh process opens the collection and searches once; its resident memory afterwards minus before,
  per point, with the copy of ids and payloads in memory (the default) and without it (payload cache 0).
- indexing: the same points upserted in chunks of 256 (a worker's chunk) into a new collection by one process,
  and by two processes at once (half each), alternating; wall time of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.synthetic_vectors import embedding_like
from retriever.faiss_store import FaissStore
from retriever.store import Manifest

DIM = 512
K = 10
COMMITTED = 32  # points another process commits before each measured search
CHUNK = 256  # a worker's chunk of images
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CatchUp:
    first_ms: float  # median first search after another process's commit
    warm_ms: float  # median search with nothing new committed
    repetitions: int

    @property
    def ratio(self) -> float:
        return self.first_ms / self.warm_ms


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.shared_collection", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _writer(directory: Path) -> None:
    """A writer process: on each line of stdin, commits COMMITTED new points and answers 'done'."""
    store = FaissStore.open(directory)
    for batch, _ in enumerate(sys.stdin):
        vectors = embedding_like(COMMITTED, dim=DIM, seed=10_000 + batch)
        ids = [f"w{batch:06d}{j:026d}" for j in range(COMMITTED)]
        store.upsert(ids, vectors, [{"paths": [f"/written/{batch}/{j}.jpg"]} for j in range(COMMITTED)])
        print("done", flush=True)
    store.close()


def catch_up(store: FaissStore, queries: np.ndarray, repetitions: int = 15) -> CatchUp:
    """Medians of the first search after another process committed COMMITTED points, and of a warm one."""
    writer = _child("writer", str(store.directory))
    assert writer.stdin is not None and writer.stdout is not None
    store.search(queries[-1], K)  # the copy in memory is read before the first measure
    first, warm = [], []
    try:
        for rep in range(repetitions):
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "done"
            started = time.perf_counter()
            store.search(queries[2 * rep], K)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.search(queries[2 * rep + 1], K)
            warm.append(time.perf_counter() - started)
    finally:
        writer.stdin.close()
        writer.wait(timeout=120)
    return CatchUp(1000 * statistics.median(first), 1000 * statistics.median(warm), repetitions)


def _memory(directory: Path, cache_points: int) -> None:
    """A searching process: prints its resident bytes added by opening the collection and one search."""
    import gc

    from bench.stores import release_free_memory, rss_bytes

    gc.collect()
    release_free_memory()
    before = rss_bytes()
    store = FaissStore.open(directory, payload_cache_max_points=cache_points)
    store.search(embedding_like(1, dim=DIM, seed=99)[0], K)
    gc.collect()
    release_free_memory()
    print(json.dumps({"added": rss_bytes() - before, "count": store.count()}), flush=True)
    store.close()


def searching_process_memory(directory: Path, cache_points: int) -> float:
    """Resident bytes per point that a new searching process adds by opening and searching once."""
    child = _child("memory", str(directory), str(cache_points))
    out, _ = child.communicate(timeout=1200)
    report = json.loads(out.strip().splitlines()[-1])
    return float(report["added"]) / int(report["count"])


def _indexer(directory: Path, start: int, stop: int, total: int) -> None:
    """An indexing process: upserts points start..stop of the seeded draw of `total`, in chunks."""
    vectors = embedding_like(total, dim=DIM, seed=5)[start:stop]
    manifest = Manifest(encoder="bench", weights="synthetic", dim=DIM, index_type="flat")
    store = FaissStore.open(directory, manifest)
    for offset in range(0, len(vectors), CHUNK):
        rows = range(start + offset, min(stop, start + offset + CHUNK))
        store.upsert(
            [f"{i:032x}" for i in rows],
            vectors[offset : offset + len(rows)],
            [{"paths": [f"/indexed/{i}.jpg"]} for i in rows],
        )
    store.save()
    store.close()


def concurrent_indexing(workdir: Path, points: int, rounds: int = 2) -> dict[str, float]:
    """Seconds to upsert `points` into a new collection by one process, and by two at once; medians."""
    one, two = [], []
    for round_ in range(rounds):
        for processes in (1, 2) if round_ % 2 == 0 else (2, 1):
            directory = workdir / f"indexing-{round_}-{processes}"
            bounds = np.linspace(0, points, processes + 1).astype(int)
            started = time.perf_counter()
            children = [
                _child("index", str(directory), str(bounds[i]), str(bounds[i + 1]), str(points))
                for i in range(processes)
            ]
            for child in children:
                child.communicate(timeout=3600)
                assert child.returncode == 0
            seconds = time.perf_counter() - started
            store = FaissStore.open(directory)
            assert store.count() == points, store.count()
            store.close()
            (one if processes == 1 else two).append(seconds)
    return {"one_s": statistics.median(one), "two_s": statistics.median(two), "points": points}


def print_report(size: int, index_type: str, result: CatchUp, with_cache: float, without_cache: float) -> None:
    print(
        f"faiss-{index_type} n={size}: first search after another process committed {COMMITTED} points "
        f"{result.first_ms:.2f} ms, warm {result.warm_ms:.2f} ms: {result.ratio:.2f}x "
        f"(medians of {result.repetitions}); a searching process adds {with_cache:.0f} B/point with the payload "
        f"cache, {without_cache:.0f} B/point without"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("writer", "memory", "index"):
        role, *args = sys.argv[1:]
        if role == "writer":
            _writer(Path(args[0]))
        elif role == "memory":
            _memory(Path(args[0]), int(args[1]))
        else:
            _indexer(Path(args[0]), int(args[1]), int(args[2]), int(args[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--index-type", default="flat", choices=["flat", "hnsw"])
    parser.add_argument("--indexing-points", type=int, default=100_000)
    args = parser.parse_args()
    from bench.stores import build

    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        vectors = embedding_like(args.size + 40, dim=DIM, seed=0)
        store, _ = build(args.index_type, workdir, vectors[: args.size])
        assert isinstance(store, FaissStore)
        result = catch_up(store, vectors[args.size :])
        store.close()
        memory = searching_process_memory(store.directory, 4_000_000), searching_process_memory(store.directory, 0)
        print_report(args.size, args.index_type, result, *memory)
        if args.indexing_points:
            timing = concurrent_indexing(workdir, args.indexing_points)
            print(
                f"indexing {timing['points']:.0f} points in chunks of {CHUNK}: one process {timing['one_s']:.1f} s, "
                f"two at once {timing['two_s']:.1f} s ({timing['one_s'] / timing['two_s']:.2f}x the rate)"
            )


if __name__ == "__main__":
    main()
