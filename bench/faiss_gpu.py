"""FAISS on the GPU against the CPU, side by side in one run: flat search and IVF-PQ training at 1M.

    .venv/bin/python -m bench.faiss_gpu [--n 1000000] [--dim 512] [--queries 1000] [--k 10] [--repeat 3]
        [--train-sample 65536] [--nlist 4000] [--pq-m 32]

Needs a GPU build of faiss (`pip install 'vlsearch[gpu]'`, faiss-gpu) and a GPU; with a CPU-only build it says
so and exits 0. Data: `--n` seeded random unit vectors of `--dim` (isotropic: speed only; flat search is exact on
any data). Both devices search and train through retriever/faiss_device.py, the code the store runs.

Flat: one batch of `--queries` queries, top `--k`, unfiltered: the CPU `IndexIDMap2(IndexFlatIP)` against
`GpuFlatSearch` over it (its first search copies the index to the GPU; that copy is timed apart). Median of
`--repeat` runs after one warm-up; the fids found on both devices must agree (ties aside).
IVF-PQ: `train_ivf` of `IVF{nlist},PQ{pq_m}x8` (inner product, the store's defaults at 1M: nlist 4 * sqrt(n),
a 65,536-point sample, PQ32) on the CPU and on the GPU (k-means assignment on GPU flat indexes), one run each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from retriever.faiss_device import FaissDevice, GpuFlatSearch, gpu_available, train_ivf


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n seeded float32 unit vectors, made in chunks (a float64 draw of 1M x 512 would take 4 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed(work: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of `repeat` runs after one warm-up, and the last result."""
    result = work()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def ivfpq(dim: int, nlist: int, pq_m: int) -> Any:
    index: Any = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x8", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False  # as the store: unused by its searches, 500x the training time
    return index


def bench_flat(base: np.ndarray, queries: np.ndarray, k: int, repeat: int) -> None:
    """One batch of queries on the CPU flat index and on its GPU copy, the store's index shape."""
    n, dim = base.shape
    cpu: Any = faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    fids = np.arange(n, dtype=np.int64) * 7 + 3  # fids are not row numbers, as in the store
    cpu.add_with_ids(base, fids)
    gpu = GpuFlatSearch(cpu)
    start = time.perf_counter()
    gpu.search(queries[:1], k)  # copies the index to the GPU
    copy_s = time.perf_counter() - start
    params = faiss.SearchParameters()
    cpu_s, (_, cpu_fids) = timed(lambda: cpu.search(queries, k, params=params), repeat)
    gpu_s, (_, gpu_fids) = timed(lambda: gpu.search(queries, k), repeat)
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(cpu_fids, gpu_fids, strict=True)]))
    print()
    print(f"flat search, {len(queries)} queries x top {k} over {n:,}:")
    print(f"  cpu {cpu_s * 1000:9.1f} ms   ({len(queries) / cpu_s:10.0f} q/s)")
    print(f"  gpu {gpu_s * 1000:9.1f} ms   ({len(queries) / gpu_s:10.0f} q/s)   cpu/gpu {cpu_s / gpu_s:6.1f}x")
    print(f"  copy to gpu (first search) {copy_s:.2f} s; top-{k} agreement gpu vs cpu {agree:.4f}")


def bench_ivfpq(base: np.ndarray, nlist: int, pq_m: int, train_sample: int) -> None:
    """train_ivf of one IVF-PQ index on the GPU and one on the CPU, on the same seeded sample."""
    n, dim = base.shape
    sample = base[np.sort(np.random.default_rng(0).choice(n, size=min(n, train_sample), replace=False))]
    times: dict[FaissDevice, float] = {}
    devices: tuple[FaissDevice, ...] = ("cuda", "cpu")
    for device in devices:
        index = ivfpq(dim, nlist, pq_m)
        start = time.perf_counter()
        train_ivf(index, sample, device)
        times[device] = time.perf_counter() - start
        assert index.is_trained
    print()
    print(f"IVF-PQ training, IVF{nlist},PQ{pq_m}x8 on {len(sample):,} of the {n:,} vectors:")
    print(f"  cpu {times['cpu']:9.2f} s")
    print(f"  gpu {times['cuda']:9.2f} s   cpu/gpu {times['cpu'] / times['cuda']:6.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--train-sample", type=int, default=65_536)
    parser.add_argument("--nlist", type=int, default=None, help="default: 4 * sqrt(n), as the store")
    parser.add_argument("--pq-m", type=int, default=32)
    args = parser.parse_args(argv)

    if not gpu_available():
        build = "a GPU build without a visible GPU" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
        print(
            f"no GPU build of faiss with a GPU is present here ({build}, faiss {faiss.__version__}); "
            f"install faiss-gpu (pip install 'vlsearch[gpu]') on a GPU machine to run this benchmark"
        )
        return 0

    print(
        f"faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s), {os.cpu_count()} CPU cores, "
        f"omp threads {faiss.omp_get_max_threads()}"
    )
    start = time.perf_counter()
    base = unit_vectors(args.n, args.dim, seed=0)
    queries = unit_vectors(args.queries, args.dim, seed=1)
    print(f"data: {args.n:,} x {args.dim} unit vectors, {args.queries} queries ({time.perf_counter() - start:.1f} s)")

    bench_flat(base, queries, args.k, args.repeat)
    nlist = args.nlist or max(1, round(4 * math.sqrt(args.n)))
    bench_ivfpq(base, nlist, args.pq_m, args.train_sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
