"""What only the Qdrant store does: point ids, the manifest in collection metadata, local-mode locking, server
mode construction, typed errors, fork, batching, the scroll order paths and how payload updates merge under
concurrent writers (the shared behaviour is in test_store_contract.py); and copying a collection between stores."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from bench.synthetic_vectors import isotropic
from indexer.errors import StoreUnavailable
from retriever.errors import (
    CollectionClosed,
    CollectionCorrupt,
    CollectionNotFound,
    EncoderMismatch,
    InvalidStoreSettings,
    StoreBusy,
)
from retriever.faiss_store import FaissStore
from retriever.keywords import payload_text
from retriever.qdrant_store import (
    MANIFEST_KEY,
    ORDERED_KEY,
    TEXT_FIELD,
    QdrantStore,
    list_qdrant_collections,
    point_uuid,
)
from retriever.store import Filter, Manifest, MigrationIncomplete, PayloadUpdate, copy_points

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
    with pytest.raises(StoreBusy, match=r"open elsewhere.*Qdrant server \(VLSEARCH_QDRANT_URL\) for several processes"):
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


def closed_port_url() -> str:
    """A loopback URL that nothing listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_mode_connects_by_url_and_names_an_unreachable_server(tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(StoreUnavailable, match=rf"cannot reach Qdrant at {url} \(VLSEARCH_QDRANT_URL\)"):
        QdrantStore.open("photos", MANIFEST, url=url, api_key="secret", timeout=2)
    with pytest.raises(StoreUnavailable, match=rf"cannot reach Qdrant at {url} \(VLSEARCH_QDRANT_URL\)"):
        list_qdrant_collections(url=url)


@pytest.fixture
def server_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[QdrantStore]:
    """A server-mode store whose server is gone after opening: open's own requests are skipped, every later one
    goes to a closed loopback port."""
    monkeypatch.setattr(QdrantStore, "_open_collection", staticmethod(lambda *args: (MANIFEST, True)))
    monkeypatch.setattr(QdrantStore, "_ensure_payload_indexes", lambda self: None)
    store = QdrantStore.open("photos", MANIFEST, url=closed_port_url(), timeout=2)
    yield store
    store.close()


OPERATIONS: dict[str, Callable[[QdrantStore], object]] = {
    "upsert": lambda store: store.upsert(["a"], isotropic(1, DIM), [{}]),
    "update_payloads": lambda store: store.update_payloads({"a": PayloadUpdate(add={"tags": ("t",)})}),
    "set_payload": lambda store: store.set_payload("a", {}),
    "ids_by_path": lambda store: store.ids_by_path(["/a.jpg"]),
    "delete": lambda store: store.delete(["a"]),
    "get": lambda store: store.get(["a"]),
    "count": lambda store: store.count(),
    "scroll": lambda store: list(store.scroll()),
    "search": lambda store: store.search(isotropic(1, DIM)[0], k=3),
    "keyword_search": lambda store: store.keyword_search("cat", k=3),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_operation_on_an_unreachable_server_is_store_unavailable_naming_the_url(
    server_store: QdrantStore, operation: str
) -> None:
    unreachable = r"cannot reach Qdrant at http://127\.0\.0\.1:\d+ \(VLSEARCH_QDRANT_URL\)"
    with pytest.raises(StoreUnavailable, match=unreachable):
        OPERATIONS[operation](server_store)


class _Unavailable(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": {"error": "overloaded"}}')

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_server_answering_503_is_store_unavailable() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(StoreUnavailable, match=rf"Qdrant at {url} \(VLSEARCH_QDRANT_URL\) cannot answer now: 503"):
            QdrantStore.open("photos", MANIFEST, url=url, timeout=2)
    finally:
        server.shutdown()
        server.server_close()


def test_a_closed_store_raises_collection_closed(tmp_path: Path) -> None:
    store = open_local(tmp_path)
    store.close()
    for operation in sorted(OPERATIONS):
        with pytest.raises(CollectionClosed, match="photos"):
            OPERATIONS[operation](store)
    with pytest.raises(CollectionClosed):
        store.save()
    store.close()  # twice is harmless


def run_in_fork(child: Callable[[], str]) -> str:
    """What child() returns when run in a forked child process (its exception's repr when it raises)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            outcome = child()
        except BaseException as error:
            outcome = f"raised {error!r}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_an_embedded_store_opened_before_a_fork_is_refused_in_the_child_and_kept_by_the_parent(
    tmp_path: Path,
) -> None:
    store = open_local(tmp_path)
    store.upsert(["a", "b"], isotropic(2, DIM), [{"tags": ["t"]}, {}])

    def child() -> str:
        try:
            store.count()
            return "the child used the parent's embedded client"
        except StoreBusy as error:
            message = str(error)
        store.close()  # releases nothing of the parent's
        del store._client
        gc.collect()
        return message

    message = run_in_fork(child)
    assert "before this process forked" in message and "VLSEARCH_QDRANT_URL" in message, message
    assert store.count(Filter(tags_any=("t",))) == 1  # the parent's store works on
    store.upsert(["c"], isotropic(1, DIM, seed=1), [{}])
    with pytest.raises(StoreBusy):  # and still holds the directory
        open_local(tmp_path, None)
    store.close()
    with open_local(tmp_path, None) as again:
        assert again.count() == 3


def test_a_server_store_opened_before_a_fork_connects_again_in_the_child(server_store: QdrantStore) -> None:
    parents = server_store._client

    def child() -> str:
        with contextlib.suppress(StoreUnavailable):  # through a client of its own, to the same (unreachable) server
            server_store.count()
        own = server_store._client
        return f"{own is not parents} {'close' in vars(parents)} {'close' in vars(own)}"

    assert run_in_fork(child) == "True True False"  # a new client; the inherited one can never be closed there
    assert server_store._client is parents and "close" not in vars(parents)


# --- payload updates under concurrent writers ------------------------------------------------------------

POINT = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def one_point(tmp_path: Path) -> Iterator[QdrantStore]:
    with open_local(tmp_path) as store:
        store.upsert([POINT], isotropic(1, DIM), [{"paths": ["/a.jpg"], "captions": {"tiny": "a cat"}}])
        yield store


def raw_payload(store: QdrantStore) -> dict[str, Any]:
    [point] = store._client.retrieve("photos", ids=[point_uuid(POINT)])
    return dict(point.payload or {})


def interfere_before_writes(store: QdrantStore, writer: Callable[[int], object]) -> list[list[Any]]:
    """Run writer(n) (another process's write) just before the store's n-th batch of payload operations reaches
    Qdrant, i.e. after the store read the payload; returns the batches of operations sent."""
    client = store._client
    real = client.batch_update_points
    sent: list[list[Any]] = []

    def interfering(name: str, update_operations: list[Any], wait: bool) -> object:
        writer(len(sent))
        sent.append(list(update_operations))
        return real(name, update_operations=update_operations, wait=wait)

    client.batch_update_points = interfering  # type: ignore[method-assign,assignment]
    return sent


def test_a_path_another_writer_adds_between_read_and_write_is_kept(one_point: QdrantStore) -> None:
    client = one_point._client

    def other_process(n: int) -> None:
        if n == 0:  # it read ["/a.jpg"] too, and wrote its whole list
            client.set_payload("photos", payload={"paths": ["/a.jpg", "/b.jpg"]}, points=[point_uuid(POINT)])

    sent = interfere_before_writes(one_point, other_process)
    result = one_point.update_payloads({POINT: PayloadUpdate(add={"paths": ("/c.jpg",)}, captions={"big": "cat"})})
    assert result[POINT] == {"paths": ["/a.jpg", "/b.jpg", "/c.jpg"], "captions": {"tiny": "a cat", "big": "cat"}}
    assert len(sent) == 2  # the write from the stale read did not apply; the second did
    assert raw_payload(one_point)[TEXT_FIELD] == payload_text(result[POINT])


def test_a_value_another_writer_removes_after_the_write_is_added_again(one_point: QdrantStore) -> None:
    client = one_point._client
    client.set_payload("photos", payload={"tags": []}, points=[point_uuid(POINT)])
    original = client.batch_update_points
    calls: list[int] = []

    def remove_after_first(name: str, update_operations: list[Any], wait: bool) -> object:
        outcome = original(name, update_operations=update_operations, wait=wait)
        if not calls:  # after the store's write applied, another process replaces the tags
            client.set_payload("photos", payload={"tags": ["dog"]}, points=[point_uuid(POINT)])
        calls.append(1)
        return outcome

    client.batch_update_points = remove_after_first  # type: ignore[method-assign,assignment]
    result = one_point.update_payloads({POINT: PayloadUpdate(add={"tags": ("cat",)})})
    assert result[POINT]["tags"] == ["dog", "cat"]
    assert len(calls) == 2


def test_a_writer_that_keeps_changing_the_list_makes_the_update_store_busy(one_point: QdrantStore) -> None:
    client = one_point._client

    def other_process(n: int) -> None:
        client.set_payload("photos", payload={"paths": ["/a.jpg", f"/other-{n}.jpg"]}, points=[point_uuid(POINT)])

    interfere_before_writes(one_point, other_process)
    with pytest.raises(StoreBusy, match=rf"{POINT}.*kept changing"):
        one_point.update_payloads({POINT: PayloadUpdate(add={"paths": ("/c.jpg",)})})


def test_an_update_sends_only_the_fields_it_changes(one_point: QdrantStore) -> None:
    sent = interfere_before_writes(one_point, lambda n: None)
    one_point.update_payloads({POINT: PayloadUpdate(set={"width": 640})})
    one_point.update_payloads({POINT: PayloadUpdate(captions={"big": "a cat"})})
    one_point.update_payloads({POINT: PayloadUpdate(add={"paths": ("/a.jpg",)}, captions={"big": "a cat"})})  # no-op
    assert len(sent) == 2
    [[width], [caption, text]] = sent
    assert isinstance(width, models.SetPayloadOperation) and width.set_payload.payload == {"width": 640}
    assert isinstance(caption, models.SetPayloadOperation) and caption.set_payload.key == "captions"
    assert caption.set_payload.payload == {"big": "a cat"}  # the entry, merged by Qdrant into the captions
    assert text.set_payload.payload == {TEXT_FIELD: "a jpg a cat a cat"}
    assert raw_payload(one_point)[TEXT_FIELD] == "a jpg a cat a cat"


def test_an_update_of_a_point_deleted_meanwhile_leaves_it_out_and_does_not_bring_it_back(
    one_point: QdrantStore,
) -> None:
    client = one_point._client
    interfere_before_writes(
        one_point, lambda n: client.delete("photos", points_selector=models.PointIdsList(points=[point_uuid(POINT)]))
    )
    assert one_point.update_payloads({POINT: PayloadUpdate(add={"tags": ("t",)}, set={"width": 1})}) == {}
    assert one_point.count() == 0


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
