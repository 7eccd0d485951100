"""Where FAISS runs: the device setting, the GPU copy of a flat index, IVF-PQ training on either device.

This machine has faiss-cpu and no GPU. The GPU paths are tested against `FakeGpuFaiss`, a fake at the GPU
boundary only: it reports one GPU, records the GPU calls (`StandardGpuResources`, `index_cpu_to_gpu`), and
stands a real CPU copy of the index in for the GPU one, so every search and every training still runs in real
faiss and its results can be checked. What it cannot show is GPU speed or GPU numerics: bench/faiss_gpu.py
measures those on a machine with a GPU build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from indexer.errors import InvalidSetting
from retriever.faiss_device import (
    DEVICE_SETTING,
    GPU_MAX_K,
    GpuFlatSearch,
    gpu_available,
    gpu_resources,
    resolve_faiss_device,
    train_ivf,
)

DIM = 32


class RecordedCopy:
    """The stand-in for a GPU flat index: a real CPU clone that logs the calls made on it."""

    def __init__(self, index: Any, log: list[str]) -> None:
        self.index, self.log = index, log

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        self.log.append(f"gpu add {len(vectors)}")
        self.index.add(vectors)

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.log.append("gpu search")
        scores, rows = self.index.search(queries, n)
        return scores, rows


class FakeGpuFaiss:
    """faiss with GPU support and `gpus` GPUs: the real module, but for the GPU functions, which are recorded."""

    def __init__(self, gpus: int = 1, wrap_copies: bool = True) -> None:
        self.gpus, self.wrap_copies = gpus, wrap_copies
        self.log: list[str] = []
        self.copied: list[tuple[str, int, int]] = []  # (class of the CPU index, its dimension, device)

    def __getattr__(self, name: str) -> Any:
        return getattr(faiss, name)

    def get_num_gpus(self) -> int:
        return self.gpus

    def StandardGpuResources(self) -> object:  # faiss's name
        self.log.append("resources")
        return object()

    def index_cpu_to_gpu(self, resources: object, device: int, index: Any) -> Any:
        self.log.append("to gpu")
        self.copied.append((type(index).__name__, int(index.d), device))
        clone = faiss.clone_index(index)
        return RecordedCopy(clone, self.log) if self.wrap_copies else clone


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def flat_index(fids: np.ndarray, vectors: np.ndarray) -> Any:
    """The store's flat index: IDMap2 over an inner-product flat index."""
    index: Any = faiss.index_factory(vectors.shape[1], "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vectors, fids)
    return index


# --- the device setting ---------------------------------------------------------------------------------------


def test_auto_is_the_gpu_exactly_when_the_installed_faiss_has_one() -> None:
    assert resolve_faiss_device("auto") == ("cuda" if gpu_available() else "cpu")
    assert resolve_faiss_device("cpu") == "cpu"


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="a GPU build of faiss is installed here")
def test_cuda_without_a_gpu_build_names_the_setting_and_the_fix() -> None:
    assert resolve_faiss_device("auto") == "cpu"
    with pytest.raises(InvalidSetting, match=DEVICE_SETTING) as raised:
        resolve_faiss_device("cuda")
    message = str(raised.value)
    assert "faiss-gpu" in message and "gpu extra" in message and "cpu or auto" in message
    assert "\n" not in message


def test_an_unknown_device_is_an_invalid_setting() -> None:
    with pytest.raises(InvalidSetting, match=f"{DEVICE_SETTING}='gpu'"):
        resolve_faiss_device("gpu")


def test_with_a_gpu_build_and_a_gpu_auto_and_cuda_are_the_gpu() -> None:
    fake = FakeGpuFaiss(gpus=1)
    assert resolve_faiss_device("auto", fake) == "cuda"
    assert resolve_faiss_device("cuda", fake) == "cuda"
    assert resolve_faiss_device("cpu", fake) == "cpu"


def test_a_gpu_build_that_sees_no_gpu_falls_back_to_the_cpu_on_auto_only() -> None:
    fake = FakeGpuFaiss(gpus=0)
    assert resolve_faiss_device("auto", fake) == "cpu"
    with pytest.raises(InvalidSetting, match=rf"{DEVICE_SETTING}=cuda.*no GPU"):
        resolve_faiss_device("cuda", fake)


def test_one_gpu_resources_object_per_process_and_a_new_one_in_a_forked_child() -> None:
    fake = FakeGpuFaiss()
    first = gpu_resources(fake)
    assert gpu_resources(fake) is first and fake.log == ["resources"]
    pid = os.fork()
    if pid == 0:  # the child: the parent's CUDA context is not its own
        try:
            os._exit(0 if gpu_resources(fake) is not first else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert gpu_resources(fake) is first


# --- flat search on the GPU copy ------------------------------------------------------------------------------


def test_gpu_flat_search_answers_as_the_cpu_index_and_follows_adds_and_removes() -> None:
    fids = np.arange(0, 3000, 3, dtype=np.int64)  # fids are not row numbers
    vectors = unit_vectors(len(fids))
    cpu = flat_index(fids, vectors)
    fake = FakeGpuFaiss()
    gpu = GpuFlatSearch(cpu, faiss_module=fake)
    queries = unit_vectors(5, seed=1)

    assert not gpu.built and fake.log == []  # nothing copied before the first search
    scores, found = gpu.search(queries, 10)
    expected_scores, expected = cpu.search(queries, 10)
    assert fake.log == ["resources", "to gpu", "gpu search"]
    assert fake.copied == [("IndexFlat", DIM, 0)]  # the inner flat index, without the id map
    assert found.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)

    # Added pairs are mirrored onto the copy, not copied again.
    new_fids, new_vectors = np.array([7001, 7002], dtype=np.int64), queries[:2].copy()
    cpu.add_with_ids(new_vectors, new_fids)
    gpu.add(new_fids, new_vectors)
    _, found = gpu.search(queries[:2], 1)
    assert found[:, 0].tolist() == [7001, 7002]
    assert fake.log.count("to gpu") == 1 and "gpu add 2" in fake.log

    # Removes invalidate the copy; the next search copies again and never returns a removed fid.
    cpu.remove_ids(faiss.IDSelectorBatch(new_fids))
    gpu.invalidate()
    assert not gpu.built
    _, found = gpu.search(queries, 10)
    assert fake.log.count("to gpu") == 2
    assert found.tolist() == cpu.search(queries, 10)[1].tolist()
    assert not set(found.ravel()) & {7001, 7002}


def test_a_change_to_the_cpu_index_that_was_not_mirrored_is_caught_by_a_rebuild() -> None:
    fids = np.arange(100, dtype=np.int64)
    cpu = flat_index(fids, unit_vectors(100))
    fake = FakeGpuFaiss()
    gpu = GpuFlatSearch(cpu, faiss_module=fake)
    gpu.search(unit_vectors(1, seed=2), 3)
    extra = unit_vectors(1, seed=3)
    cpu.add_with_ids(extra, np.array([555], dtype=np.int64))  # no gpu.add
    _, found = gpu.search(extra, 1)
    assert found[0, 0] == 555 and fake.log.count("to gpu") == 2


def test_filtered_and_very_deep_searches_run_on_the_cpu_index() -> None:
    fids = np.arange(10, 510, dtype=np.int64)
    cpu = flat_index(fids, unit_vectors(500))
    fake = FakeGpuFaiss()
    gpu = GpuFlatSearch(cpu, faiss_module=fake)
    queries = unit_vectors(3, seed=4)
    allowed = np.array([12, 40, 41, 300, 499], dtype=np.int64)
    scores, found = gpu.search(queries, 3, allowed)
    assert set(found.ravel()) <= set(allowed.tolist())
    exact = queries @ cpu.index.reconstruct_n(0, 500).T  # rows in fid order minus 10
    best = np.sort(exact[:, allowed - 10], axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(scores, best, rtol=1e-5)
    scores, found = gpu.search(queries, GPU_MAX_K + 1)
    assert found.shape == (3, GPU_MAX_K + 1) and (found[:, 500:] == -1).all()
    assert fake.log == []  # neither touched the GPU


def test_more_results_than_points_and_an_empty_index_give_minus_one_fids() -> None:
    fake = FakeGpuFaiss()
    cpu = flat_index(np.array([4, 9], dtype=np.int64), unit_vectors(2))
    _, found = GpuFlatSearch(cpu, faiss_module=fake).search(unit_vectors(1, seed=5), 4)
    assert sorted(found[0, :2].tolist()) == [4, 9] and found[0, 2:].tolist() == [-1, -1]
    empty: Any = faiss.index_factory(DIM, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    _, found = GpuFlatSearch(empty, faiss_module=fake).search(unit_vectors(2, seed=6), 3)
    assert found.shape == (2, 3) and (found == -1).all()


# --- IVF-PQ training ------------------------------------------------------------------------------------------


TRAIN = 10_000  # PQ codebooks of 256 centroids want about 39 points each
RECALL_FLOOR = 0.55  # measured 0.69 at PQ16x8, nprobe 4 of 16, against exact search


def ivfpq(dim: int = DIM, nlist: int = 16, pq_m: int = 16) -> Any:
    index: Any = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x8", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False
    return index


def clustered(n: int, centres: int = 16, seed: int = 7) -> np.ndarray:
    """Unit vectors around a few centres, like embeddings (uniform noise has no neighbours worth finding)."""
    rng = np.random.default_rng(seed)
    means = unit_vectors(centres, seed=seed)
    vectors = means[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index: Any, vectors: np.ndarray, queries: np.ndarray) -> float:
    index.nprobe = 4
    _, found = index.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


def test_ivfpq_trained_on_the_cpu_searches_correctly() -> None:
    vectors, queries = clustered(TRAIN), clustered(50, seed=8)
    index = ivfpq()
    train_ivf(index, vectors, "cpu")
    assert index.is_trained
    index.add(vectors)
    assert recall_at_10(index, vectors, queries) >= RECALL_FLOOR
    _, own = index.search(vectors[:50], 1)
    assert np.mean(own[:, 0] == np.arange(50)) >= 0.9  # a point finds itself


def test_ivfpq_trained_on_the_gpu_assigns_with_gpu_flat_indexes_and_searches_as_well() -> None:
    vectors, queries = clustered(TRAIN), clustered(50, seed=8)
    fake = FakeGpuFaiss(wrap_copies=False)  # faiss keeps a pointer to the clustering index: a real index
    index = ivfpq()
    train_ivf(index, vectors, "cuda", faiss_module=fake)
    assert fake.log == ["resources", "to gpu", "to gpu"]
    # Coarse centroids by inner product (the metric of the CPU path's quantizer), PQ codebooks by L2 per slice.
    assert fake.copied == [("IndexFlatIP", DIM, 0), ("IndexFlatL2", DIM // 16, 0)]
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert index.is_trained and ivf.clustering_index is None and ivf.pq.assign_index is None
    index.add(vectors)
    assert recall_at_10(index, vectors, queries) >= RECALL_FLOOR

    cpu_trained = ivfpq()
    train_ivf(cpu_trained, vectors, "cpu")
    cpu_trained.add(vectors)
    assert abs(recall_at_10(index, vectors, queries) - recall_at_10(cpu_trained, vectors, queries)) <= 0.1


def test_training_on_cuda_without_a_gpu_build_is_an_invalid_setting() -> None:
    if gpu_available():
        pytest.skip("a GPU build of faiss with a GPU is installed here")
    with pytest.raises(InvalidSetting, match=DEVICE_SETTING):
        train_ivf(ivfpq(), clustered(1000), "cuda")


# --- the store on each device ---------------------------------------------------------------------------------


def test_the_store_takes_the_device_setting_and_falls_back_to_cpu_without_a_gpu(tmp_path: Path) -> None:
    from retriever.faiss_store import FaissStore
    from retriever.store import Manifest

    manifest = Manifest(encoder="test", weights="untrained", dim=DIM)
    store = FaissStore.open(tmp_path / "c", manifest, faiss_device="auto")
    assert store.settings.device == ("cuda" if gpu_available() else "cpu")
    store.close()
    if not gpu_available():
        with pytest.raises(InvalidSetting, match="VLSEARCH_FAISS_DEVICE"):
            FaissStore.open(tmp_path / "c", faiss_device="cuda")


def test_on_cuda_the_store_searches_a_gpu_copy_and_answers_as_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's wiring, with the fake GPU faiss at the GPU boundary (no GPU here): unfiltered flat searches
    go to the GPU copy, filtered ones to the CPU index; a delete drops the copy, which is rebuilt; IVF-PQ
    training assigns on the GPU; every answer equals the CPU store's."""
    from dataclasses import replace
    from functools import partial

    from retriever import faiss_store
    from retriever.faiss_store import FaissStore
    from retriever.store import Filter, Manifest

    fake = FakeGpuFaiss()
    monkeypatch.setattr(faiss_store, "resolve_faiss_device", lambda requested: "cuda")
    monkeypatch.setattr(faiss_store, "GpuFlatSearch", partial(faiss_store.GpuFlatSearch, faiss_module=fake))
    trainer = FakeGpuFaiss(wrap_copies=False)  # faiss takes only real indexes as clustering indexes
    monkeypatch.setattr(faiss_store, "train_ivf", partial(faiss_store.train_ivf, faiss_module=trainer))
    vectors = unit_vectors(300, seed=3)
    ids = [f"p{i:03d}" for i in range(300)]
    payloads = [{"tags": ["even" if i % 2 == 0 else "odd"]} for i in range(300)]
    manifest = Manifest(encoder="test", weights="untrained", dim=DIM)
    gpu = FaissStore.open(tmp_path / "gpu", manifest, faiss_device="cuda")
    ivf = FaissStore.open(
        tmp_path / "ivf", replace(manifest, index_type="ivfpq"), faiss_device="cuda", ivf_nlist=4, pq_m=4
    )
    ivf.upsert(ids, vectors, payloads)  # enough to train: k-means assigns on the "GPU"
    assert ivf.index_info().kind == "ivfpq" and ("IndexFlatIP", DIM, 0) in trainer.copied
    assert ivf.search(vectors[7], k=1)[0].id == ids[7]
    ivf.close()
    monkeypatch.undo()
    cpu = FaissStore.open(tmp_path / "cpu", manifest, faiss_device="cpu")
    for store in (gpu, cpu):
        store.upsert(ids, vectors, payloads)
    queries = unit_vectors(5, seed=4)

    def answers(store: FaissStore, flt: Filter | None = None) -> list[list[tuple[str, float]]]:
        return [[(hit.id, round(hit.score, 5)) for hit in store.search(q, k=10, filter=flt)] for q in queries]

    assert gpu.settings.device == "cuda" and cpu.settings.device == "cpu"
    assert answers(gpu) == answers(cpu) and "gpu search" in fake.log
    searched = fake.log.count("gpu search")
    assert answers(gpu, Filter(tags_any=("even",))) == answers(cpu, Filter(tags_any=("even",)))
    assert fake.log.count("gpu search") == searched  # filtered: on the CPU index
    for store in (gpu, cpu):
        store.delete(ids[:50])
    copies = fake.log.count("to gpu")
    assert answers(gpu) == answers(cpu) and fake.log.count("to gpu") == copies + 1  # rebuilt after the delete
    gpu.close()
    cpu.close()
