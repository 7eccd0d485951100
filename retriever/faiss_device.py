"""FAISS on the GPU where the faiss build has one: the device choice, a GPU copy of a flat index, IVF-PQ training.

`VLSEARCH_FAISS_DEVICE=auto|cpu|cuda` (auto by default) is resolved once by `resolve_faiss_device`. With a GPU
build of faiss (`faiss-gpu`, the `gpu` extra) and a GPU, unfiltered flat searches run on a GPU copy of the
index and IVF-PQ k-means runs on the GPU; everything else, and every machine without one, runs on the CPU as
before. The CPU index stays the one of record (saved, filtered, reconstructed); the GPU copy only answers.
Every faiss call goes through a `faiss_module` argument, so that tests can stand a fake in at the GPU boundary.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Literal

import faiss
import numpy as np

from indexer.errors import InvalidSetting

DEVICE_SETTING = "VLSEARCH_FAISS_DEVICE"
FaissDevice = Literal["cpu", "cuda"]
# Largest k a GPU flat search selects (faiss's GPU k-selection limit); larger searches run on the CPU.
GPU_MAX_K = 2048


def gpu_available(faiss_module: Any = faiss) -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    if not hasattr(faiss_module, "StandardGpuResources"):
        return False
    count = getattr(faiss_module, "get_num_gpus", lambda: 0)()
    return int(count) > 0


def resolve_faiss_device(requested: str, faiss_module: Any = faiss) -> FaissDevice:
    """The device FAISS runs on: 'auto' is cuda with a GPU build of faiss and a GPU, else cpu."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "cuda" if gpu_available(faiss_module) else "cpu"
    if requested == "cuda":
        if not hasattr(faiss_module, "StandardGpuResources"):
            raise InvalidSetting(
                f"{DEVICE_SETTING}=cuda, but the installed faiss has no GPU support; install faiss-gpu "
                f"(the gpu extra: pip install 'vlsearch[gpu]') or set {DEVICE_SETTING} to cpu or auto"
            )
        if not gpu_available(faiss_module):
            raise InvalidSetting(
                f"{DEVICE_SETTING}=cuda, but faiss sees no GPU (get_num_gpus() is 0); check the driver and "
                f"CUDA_VISIBLE_DEVICES, or set {DEVICE_SETTING} to cpu or auto"
            )
        return "cuda"
    raise InvalidSetting(f"{DEVICE_SETTING}={requested!r} is not one of auto, cpu, cuda")


# One StandardGpuResources per process (and per faiss module, for tests), made on first use: it reserves
# GPU scratch memory, and it is not safe to share between threads (GPU calls below run under a lock).
_RESOURCES: dict[Any, Any] = {}
_RESOURCES_LOCK = threading.Lock()


def gpu_resources(faiss_module: Any = faiss) -> Any:
    """The process's StandardGpuResources; InvalidSetting where faiss has no GPU."""
    resolve_faiss_device("cuda", faiss_module)
    with _RESOURCES_LOCK:
        resources = _RESOURCES.get(faiss_module)
        if resources is None:
            resources = faiss_module.StandardGpuResources()
            _RESOURCES[faiss_module] = resources
        return resources


# In a forked child the parent's CUDA context is gone: its resources and GPU indexes are never used (nor freed)
# there; each object makes new ones on first use in the child.
_PARENT_RESOURCES: list[Any] = []


def _forget_resources_in_child() -> None:
    global _RESOURCES_LOCK
    _RESOURCES_LOCK = threading.Lock()
    _PARENT_RESOURCES.extend(_RESOURCES.values())
    _RESOURCES.clear()


os.register_at_fork(after_in_child=_forget_resources_in_child)


class GpuFlatSearch:
    """A GPU copy of a CPU flat inner-product index over (fid, vector) pairs (an `IndexIDMap2` over `IndexFlatIP`).

    The CPU index is the caller's and stays the one of record: call `add` with the pairs just added to it, and
    `invalidate` after removing from it (a GPU flat index cannot remove ids cheaply: the copy is dropped and
    rebuilt from the CPU index on the next search). The copy is built on the first search. Searches restricted
    to some fids, and searches for more than GPU_MAX_K results, run on the CPU index: GPU indexes take no
    search-time id selector.
    """

    def __init__(self, cpu_index: Any, faiss_module: Any = faiss, device: int = 0) -> None:
        self.cpu_index = cpu_index
        self.faiss = faiss_module
        self.device = device
        self._gpu: Any | None = None
        self._fids: list[np.ndarray] = []  # row -> fid of the GPU copy, in chunks (appended by add)
        self._rows = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._parent_copies: list[Any] = []

    @property
    def built(self) -> bool:
        """Whether a GPU copy exists in this process now."""
        return self._gpu is not None and self._pid == os.getpid()

    def add(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        """Mirror pairs just added to the CPU index; nothing to do before the copy is built."""
        with self._lock:
            if not self.built or len(fids) == 0:
                return
            assert self._gpu is not None
            self._gpu.add(np.ascontiguousarray(vectors, dtype=np.float32))
            self._fids.append(np.asarray(fids, dtype=np.int64))
            self._rows += len(fids)

    def invalidate(self) -> None:
        """Drop the GPU copy (after removes from the CPU index); the next search rebuilds it."""
        with self._lock:
            self._drop()

    def search(self, query: np.ndarray, n: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, fids) of the best n per query row, best first, each of shape (queries, n); fid -1 past the end.

        `allowed`: only these fids are considered (searched on the CPU index).
        """
        queries = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        if allowed is not None or n > GPU_MAX_K:
            return self._search_cpu(queries, n, allowed)
        with self._lock:
            if not self.built or self._rows != int(self.cpu_index.ntotal):  # a missed add or remove: rebuild
                self._build()
            assert self._gpu is not None
            if self._rows == 0:
                return _nothing(len(queries), n)
            scores, rows = self._gpu.search(queries, n)
            if len(self._fids) > 1:
                self._fids = [np.concatenate(self._fids)]
            fids = self._fids[0]
        found = rows >= 0
        return scores, np.where(found, fids[np.where(found, rows, 0)], -1)

    def _search_cpu(self, queries: np.ndarray, n: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        params = self.faiss.SearchParameters()
        if allowed is not None:
            params.sel = self.faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        scores, fids = self.cpu_index.search(queries, n, params=params)
        return scores, fids

    def _build(self) -> None:
        """Copy the CPU index's flat vectors to the GPU, with its row -> fid map (caller holds the lock)."""
        self._drop()
        flat = self.faiss.downcast_index(self.cpu_index.index)
        fids = self.faiss.vector_to_array(self.cpu_index.id_map).astype(np.int64)
        self._gpu = self.faiss.index_cpu_to_gpu(gpu_resources(self.faiss), self.device, flat)
        self._fids, self._rows, self._pid = [fids], len(fids), os.getpid()

    def _drop(self) -> None:
        if self._gpu is not None and self._pid != os.getpid():
            self._parent_copies.append(self._gpu)  # the parent's CUDA memory: never freed in a child
        self._gpu, self._fids, self._rows = None, [], 0


def _nothing(queries: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((queries, n), -np.inf, dtype=np.float32), np.full((queries, n), -1, dtype=np.int64)


def train_ivf(index: Any, sample: np.ndarray, device: FaissDevice, faiss_module: Any = faiss) -> None:
    """Train an IVF(-PQ) index on `sample`; on cuda its k-means assigns points with a GPU flat index.

    The standard faiss way: a GPU flat index as the IVF's `clustering_index` (coarse centroids) and as the
    product quantizer's `assign_index` (PQ codebooks), detached again once trained. The trained index is an
    ordinary CPU index either way.
    """
    vectors = np.ascontiguousarray(sample, dtype=np.float32)
    if device == "cpu":
        index.train(vectors)
        return
    resources = gpu_resources(faiss_module)
    ivf = faiss_module.downcast_index(faiss_module.extract_index_ivf(index))  # IndexIVFPQ, with its pq
    # The metric the CPU path assigns with (its quantizer's): inner product for spherical k-means.
    inner_product = ivf.metric_type == faiss_module.METRIC_INNER_PRODUCT
    coarse_cpu = faiss_module.IndexFlatIP(ivf.d) if inner_product else faiss_module.IndexFlatL2(ivf.d)
    # Kept referenced until training ends: faiss holds only a raw pointer to a clustering index.
    coarse = faiss_module.index_cpu_to_gpu(resources, 0, coarse_cpu)
    pq: Any = getattr(ivf, "pq", None)
    codebook: Any = None
    if pq is not None and hasattr(pq, "assign_index"):
        codebook = faiss_module.index_cpu_to_gpu(resources, 0, faiss_module.IndexFlatL2(int(pq.dsub)))
    ivf.clustering_index = coarse
    if codebook is not None:
        pq.assign_index = codebook
    try:
        index.train(vectors)
    finally:
        ivf.clustering_index = None
        if codebook is not None:
            pq.assign_index = None
