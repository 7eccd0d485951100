"""What only the Qdrant store does: point ids, the manifest in collection metadata, local-mode locking, server
mode construction, batching and the scroll order paths (the shared behaviour is in test_store_contract.py); and
copying a collection between stores."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from bench.synthetic_vectors import isotropic
from retriever.errors import CollectionCorrupt, CollectionNotFound, EncoderMismatch, InvalidStoreSettings
from retriever.faiss_store import FaissStore
from retriever.qdrant_store import MANIFEST_KEY, ORDERED_KEY, QdrantStore, point_uuid
from retriever.store import Filter, Manifest, MigrationIncomplete, copy_points

DIM = 8
MANIFEST = Manifest(encoder="test-encoder", weights="untrained", dim=DIM, store="qdrant")


def hex_ids(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(n)]


def open_local(root: Path, manifest: Manifest | None = MANIFEST, **options: int) -> QdrantStore:
    return QdrantStore.open("photos", manifest, path=root, **options)


def test_a_content_hash_is_its_own_point_uuid_and_other_ids_map_to_a_stable_uuid5() -> None:
    content_hash = "0123456789abcdef0123456789abcdef"
    assert point_uuid(content_hash) == str(uuid.UUID(hex=content_hash))
    assert point_uuid("zz-better") == point_uuid("zz-better") != point_uuid("zz-worse")
    assert uuid.UUID(point_uuid("zz-better")).version == 5
    assert point_uuid(content_hash.upper()) != point_uuid(content_hash)  # not a content hash: hashed again


def test_points_and_manifest_are_stored_as_plain_qdrant_data(tmp_path: Path) -> None:
    ids = hex_ids(3)
    with open_local(tmp_path) as store:
        store.upsert(ids, isotropic(3, DIM), [{"paths": [f"/trip/{i}.jpg"], "tags": ["beach"]} for i in range(3)])
    raw = QdrantClient(path=str(tmp_path / "photos"))
    try:
        assert raw.get_collection("photos").config.metadata[MANIFEST_KEY] == asdict(MANIFEST)
        [point] = raw.retrieve("photos", ids=[str(uuid.UUID(hex=ids[1]))])
        assert point.payload is not None
        assert point.payload["vlsearch_id"] == ids[1] and point.payload["paths"] == ["/trip/1.jpg"]
        assert point.payload["vlsearch_text"] == "trip 1 jpg beach"
    finally:
        raw.close()


def test_a_qdrant_collection_not_made_by_vlsearch_is_refused(tmp_path: Path) -> None:
    raw = QdrantClient(path=str(tmp_path / "photos"))
    raw.create_collection("photos", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.DOT))
    raw.close()
    with pytest.raises(CollectionCorrupt, match=r"photos.*no readable vlsearch manifest"):
        open_local(tmp_path, None)


def test_a_missing_local_collection_is_not_created_by_opening_it(tmp_path: Path) -> None:
    with pytest.raises(CollectionNotFound, match="photos"):
        open_local(tmp_path, None)
    assert not (tmp_path / "photos").exists()


def test_a_second_open_of_a_local_collection_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = open_local(tmp_path)
    with pytest.raises(InvalidStoreSettings, match=r"open elsewhere.*VLSEARCH_QDRANT_URL"):
        open_local(tmp_path, None)
    first.close()
    open_local(tmp_path, None).close()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"index_type": "ivfpq"}, "not available on Qdrant"), ({"store": "faiss"}, "needs 'qdrant'")],
)
def test_manifests_qdrant_cannot_serve_are_refused(tmp_path: Path, change: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidStoreSettings, match=message):
        open_local(tmp_path, replace(MANIFEST, **change))


def test_reopening_with_another_index_type_records_it(tmp_path: Path) -> None:
    open_local(tmp_path).close()
    open_local(tmp_path, replace(MANIFEST, index_type="hnsw")).close()
    with open_local(tmp_path, None) as store:
        assert store.manifest == replace(MANIFEST, index_type="hnsw")


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_mode_connects_by_url_and_names_an_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(InvalidStoreSettings, match=rf"cannot reach Qdrant at {url} \(VLSEARCH_QDRANT_URL\)"):
        QdrantStore.open("photos", MANIFEST, url=url, api_key="secret", timeout=5)


@pytest.mark.parametrize("where", [{}, {"url": "http://localhost:6333", "path": Path("x")}], ids=["neither", "both"])
def test_a_store_needs_exactly_one_of_url_and_path(where: dict[str, object]) -> None:
    with pytest.raises(InvalidStoreSettings, match=r"url .* or a local path"):
        QdrantStore.open("photos", MANIFEST, **where)  # type: ignore[arg-type]


def test_upserts_go_to_qdrant_in_batches(tmp_path: Path) -> None:
    with open_local(tmp_path, batch_size=7) as store:
        calls: list[int] = []
        upsert = store._client.upsert

        def counting(name: str, points: models.Batch, wait: bool) -> object:
            assert wait
            calls.append(len(points.ids))
            return upsert(name, points=points, wait=wait)

        store._client.upsert = counting  # type: ignore[method-assign]
        store.upsert(hex_ids(50), isotropic(50, DIM), [{} for _ in range(50)])
        assert calls == [7] * 7 + [1]
        assert store.count() == 50


def test_payload_keys_of_the_store_are_refused(tmp_path: Path) -> None:
    with open_local(tmp_path) as store, pytest.raises(ValueError, match="vlsearch_text"):
        store.upsert(["a"], isotropic(1, DIM), [{"vlsearch_text": "x"}])


def test_scroll_is_in_id_order_with_content_hashes_and_after_another_id_joins(tmp_path: Path) -> None:
    ids = hex_ids(40)
    payloads = [{"tags": ["odd"] if i % 2 else []} for i in range(40)]
    with open_local(tmp_path) as store:
        store.upsert(ids, isotropic(40, DIM), payloads)
        assert [r.id for r in store.scroll(batch_size=6)] == sorted(ids)  # Qdrant's own point order
        odd = Filter(tags_any=("odd",))
        assert [r.id for r in store.scroll(odd, batch_size=4)] == sorted(ids[1::2])
        store.upsert(["zz-later", "00-earlier"], isotropic(2, DIM, seed=1), [{}, {"tags": ["odd"]}])
    raw = QdrantClient(path=str(tmp_path / "photos"))
    assert raw.get_collection("photos").config.metadata[ORDERED_KEY] is False
    raw.close()
    with open_local(tmp_path, None) as store:
        assert [r.id for r in store.scroll(batch_size=6)] == sorted([*ids, "zz-later", "00-earlier"])
        assert [r.id for r in store.scroll(odd, batch_size=4)] == sorted([*ids[1::2], "00-earlier"])


def test_drop_removes_the_local_collection(tmp_path: Path) -> None:
    store = open_local(tmp_path)
    store.upsert(["a"], isotropic(1, DIM), [{}])
    store.drop()
    assert not (tmp_path / "photos").exists()
    with pytest.raises(CollectionNotFound):
        open_local(tmp_path, None)


def test_writes_survive_a_process_killed_without_close(tmp_path: Path) -> None:
    # embedded Qdrant's SQLite runs in WAL mode without fsync per commit: a commit must still outlive the process
    script = f"""
import os
from bench.synthetic_vectors import isotropic
from retriever.qdrant_store import QdrantStore
from retriever.store import Manifest
store = QdrantStore.open("photos", Manifest("test-encoder", "untrained", {DIM}, store="qdrant"), path={str(tmp_path)!r})
store.upsert([f"id-{{i}}" for i in range(30)], isotropic(30, {DIM}), [{{"tags": ["t"]}}] * 30)
store.delete(["id-0"])
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).parents[2])
    with open_local(tmp_path, None) as store:
        assert store.count(Filter(tags_any=("t",))) == 29
        assert store.get(["id-0", "id-29"])[0].id == "id-29"


def test_copy_points_moves_vectors_and_payloads_and_checks_the_counts(tmp_path: Path) -> None:
    ids = [f"image-{i}" for i in range(25)]
    vectors = isotropic(25, DIM, seed=3)
    payloads = [{"paths": [f"/p/{i}.jpg"], "tags": ["t"] if i % 2 else []} for i in range(25)]
    with FaissStore.open(tmp_path / "faiss", replace(MANIFEST, store="faiss")) as source:
        source.upsert(ids, vectors, payloads)
        with open_local(tmp_path / "qdrant") as target:
            report = copy_points(source, target, batch_size=7)
            assert (report.copied, report.source_count, report.target_count) == (25, 25, 25)
            copied = {record.id: record for record in target.scroll(with_vectors=True)}
            assert [copied[i].payload for i in ids] == payloads
            assert all(np.array_equal(copied[i].vector, v) for i, v in zip(ids, vectors, strict=True))
            target.upsert(["stray"], isotropic(1, DIM), [{}])
            with pytest.raises(MigrationIncomplete, match="holds 25, but the target 'photos' holds 26"):
                copy_points(source, target)
        other = open_local(tmp_path / "other", replace(MANIFEST, weights="sha256:other"))
        with other, pytest.raises(EncoderMismatch, match="sha256:other"):
            copy_points(source, other)
