"""Store fixtures: `store` is one fresh collection per backend; `reopen` closes it and opens it again.

A backend is a function that opens the collection kept at a directory (creating it when given a manifest).
Each is one entry in BACKENDS (FAISS, and Qdrant in embedded local mode); the contract suite runs on every one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import pytest

from retriever.faiss_store import FaissStore
from retriever.qdrant_store import QdrantStore
from retriever.store import Manifest, VectorStore

Opener = Callable[[Path, Manifest | None], VectorStore]


def _open_faiss(directory: Path, manifest: Manifest | None) -> VectorStore:
    return FaissStore.open(directory, manifest)


def _open_qdrant(directory: Path, manifest: Manifest | None) -> VectorStore:
    """Qdrant in embedded local mode: the collection's own storage directory is `directory`."""
    return QdrantStore.open(directory.name, manifest, path=directory.parent)


BACKENDS: dict[str, Opener] = {"faiss": _open_faiss, "qdrant": _open_qdrant}

CONTRACT_DIM = 16


@pytest.fixture(autouse=True, scope="session")
def single_threaded_faiss() -> Iterator[None]:
    """One OpenMP thread: on a busy 2-core CI machine, thread hand-offs made single queries 30x slower."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@dataclass
class Collection:
    """Where one test's collection lives, and how to open it with the backend under test."""

    backend: str
    directory: Path
    opener: Opener
    opened: list[VectorStore] = field(default_factory=list)

    def manifest(self, **changes: Any) -> Manifest:
        base = Manifest(encoder="test-encoder", weights="untrained", dim=CONTRACT_DIM, store=self.backend)
        return replace(base, **changes)

    def open(self, manifest: Manifest | None = None) -> VectorStore:
        store = self.opener(self.directory, manifest)
        self.opened.append(store)
        return store

    def close(self, store: VectorStore) -> None:
        store.close()
        self.opened.remove(store)


@pytest.fixture(params=sorted(BACKENDS))
def collection(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Collection]:
    collection = Collection(request.param, tmp_path / "photos", BACKENDS[request.param])
    yield collection
    for store in list(collection.opened):
        collection.close(store)


@pytest.fixture
def store(collection: Collection) -> VectorStore:
    """A new, empty collection of CONTRACT_DIM-dimensional vectors."""
    return collection.open(collection.manifest())


@pytest.fixture
def reopen(collection: Collection) -> Callable[..., VectorStore]:
    """reopen(store, manifest=None): close the store and open its collection again."""

    def reopen(store: VectorStore, manifest: Manifest | None = None) -> VectorStore:
        collection.close(store)
        return collection.open(manifest)

    return reopen
