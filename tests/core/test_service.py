"""The service layer with the shipped shapes-world models on a small generated collection."""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.service import HitView, InvalidQuery, PointNotFound, Query, SearchResult, Service
from core.settings import Settings
from indexer.pipeline import content_id
from models.shapes_world import generate_scenes, render, true_captions
from retriever.errors import CollectionClosed

NO_ID = "0" * 32


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fail(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("must not be called")


def test_search_returns_typed_hits_that_serialise_to_json(service: Service, indexed: Path) -> None:
    result = service.search(Query(text="a red circle", k=5))
    assert isinstance(result, SearchResult) and result.collection == "shapes" and len(result.hits) == 5
    assert all(isinstance(hit, HitView) for hit in result.hits)
    scores = [hit.score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(hit.path is not None and Path(hit.path).parent == indexed for hit in result.hits)
    assert all(hit.paths == [hit.path] and (hit.width, hit.height) == (64, 64) for hit in result.hits)
    assert json.loads(json.dumps(result.to_dict()))["hits"][0]["id"] == result.hits[0].id


def test_info_overview_and_the_list_of_collections(service: Service, indexed: Path) -> None:
    info = service.info()
    assert (info.collection, info.count, info.manifest["encoder"]) == ("shapes", 12, "shapes-clip")
    assert service.list_collections() == ["shapes"]
    assert service.overview().collections == ["shapes"]


def test_a_store_is_opened_once_and_closed_with_the_service(service: Service, indexed: Path) -> None:
    store = service.store()
    assert service.store() is store
    service.close()
    with pytest.raises(CollectionClosed):
        store.count()
    reopened = service.store()
    assert reopened is not store and reopened.count() == 12


def test_a_forked_child_opens_its_own_store_and_the_parent_keeps_its_own(service: Service, indexed: Path) -> None:
    parent_store = service.store()
    expected = [hit.id for hit in service.search(Query(text="a red circle", k=3)).hits]
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        store = service.store()
        found = [hit.id for hit in service.search(Query(text="a red circle", k=3)).hits]
        writer.send((store is parent_store, found))

    process = context.Process(target=child)
    process.start()
    assert reader.poll(120), "the child did not answer"
    same_store, found = reader.recv()
    process.join(30)
    assert process.exitcode == 0
    assert not same_store and found == expected
    assert service.store() is parent_store and parent_store.count() == 12


def test_delete_by_path_looks_the_path_up_and_never_reads_the_collection(
    service: Service, indexed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, copy = indexed / "00000.png", indexed / "copy-of-00000.png"
    shutil.copy(original, copy)
    assert service.index([copy]).report.duplicates == 1
    store = service.store()
    looked_up: list[list[str]] = []
    real_lookup = store.ids_by_path
    monkeypatch.setattr(store, "ids_by_path", lambda paths: looked_up.append(list(paths)) or real_lookup(paths))
    monkeypatch.setattr(store, "scroll", fail)
    image_id = content_id(original.read_bytes())

    assert service.delete([str(copy)]).to_dict() == {"collection": "shapes", "deleted": 0, "count": 12}
    assert service.payload(image_id)["paths"] == [str(original)]
    assert service.delete([str(original)]).count == 11  # its last path: the image goes
    other = service.search(Query(text="a square", k=1)).hits[0].id
    assert service.delete([other]).to_dict() == {"collection": "shapes", "deleted": 1, "count": 10}
    assert any(str(copy) in paths for paths in looked_up)


def new_scene_image(seed: int) -> tuple[bytes, str]:
    """PNG bytes of a scene not in the collection, and a caption true of it."""
    scene = generate_scenes("test", 1, seed=seed, start=500)[0]
    return png(render(scene, 64)), true_captions(scene, ("object",))[0]


def test_an_image_indexed_from_bytes_is_kept_and_serves_rerank_captions_thumbnails_and_questions(
    service: Service, indexed: Path, shapes_settings: Settings
) -> None:
    data, caption = new_scene_image(seed=99)
    result = service.index_bytes([("upload.png", data)])
    (image_id,) = result.ids or []
    assert image_id == content_id(data) and (result.report.added, result.count) == (1, 13)
    payload = service.payload(image_id)
    assert (payload["paths"], payload["source_name"], payload["blob"]) == ([], "upload.png", image_id)
    assert (shapes_settings.data_dir / "blobs" / image_id[:2] / image_id).read_bytes() == data

    query = Query(text=caption, k=13, rerank=True, rerank_k=13, captions=True)
    ours = next(hit for hit in service.search(query).hits if hit.id == image_id)
    assert ours.rerank_score is not None and ours.caption and ours.path is None
    assert ours.source_name == "upload.png"
    assert service.caption([image_id])[0].caption == ours.caption  # cached in the payload
    thumbnail = service.thumbnail(image_id, 32)
    assert thumbnail.data.startswith(b"\xff\xd8") and max(thumbnail.width, thumbnail.height) == 32
    assert service.load_image(image_id).size == (64, 64)
    assert isinstance(service.ask(image_id, "What is in the image?").answer, str)


def test_bytes_of_an_indexed_file_are_kept_beside_its_path_and_kept_bytes_are_unchanged(
    service: Service, indexed: Path
) -> None:
    file = indexed / "00001.png"
    data = file.read_bytes()
    first = service.index_bytes([("a.png", data)])
    assert (first.report.added, first.report.duplicates, first.count) == (0, 1, 12)
    payload = service.payload(content_id(data))
    assert payload["paths"] == [str(file)] and payload["blob"] == content_id(data)
    again = service.index_bytes([("b.png", data)])
    assert (again.report.unchanged, again.report.duplicates) == (1, 0)
    file.unlink()
    assert service.load_image(content_id(data)).size == (64, 64)  # from the kept bytes
    assert service.delete([str(file)]).deleted == 0  # its kept bytes still hold it


def test_bytes_are_held_to_the_decoding_limits_and_fail_alone(shapes_settings: Settings) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    big, (small, _) = png(noise), new_scene_image(seed=5)
    limit = (len(small) + len(big)) // 2
    with Service(shapes_settings.model_copy(update={"max_image_bytes": limit})) as service:
        result = service.index_bytes([("big.png", big), ("ok.png", small), ("notes.png", b"hello")])
    failed = {failure.path: failure.error for failure in result.report.failed}
    assert failed == {"big.png": "ImageTooLarge", "notes.png": "UnsupportedImage"}
    assert result.ids == [None, content_id(small), None] and result.count == 1


def test_a_thumbnail_is_made_once_upright_and_bounded_then_read_from_the_cache(
    service: Service, indexed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = indexed / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 80x40, shown turned by 90 degrees: portrait 40x80
    Image.new("RGB", (80, 40), "red").save(photo, exif=exif.tobytes())
    service.index([photo])
    image_id = content_id(photo.read_bytes())
    made = service.thumbnail(image_id, 20)
    assert (made.width, made.height) == (10, 20) and made.path.is_file()
    assert Image.open(made.path).size == (10, 20)
    larger = service.thumbnail(image_id, 512)
    assert (larger.width, larger.height) == (40, 80)  # never enlarged
    monkeypatch.setattr(service.container, "load_hit_image", fail)
    again = service.thumbnail(image_id, 20)
    assert (again.data, again.path) == (made.data, made.path)
    with pytest.raises(InvalidQuery, match="between"):
        service.thumbnail(image_id, 4000)
    with pytest.raises(PointNotFound):
        service.thumbnail(NO_ID, 20)


@pytest.mark.parametrize("operation", ["similar", "caption", "thumbnail", "ask", "load_image"])
def test_an_unknown_id_is_point_not_found(service: Service, indexed: Path, operation: str) -> None:
    calls = {
        "similar": lambda: service.similar(NO_ID),
        "caption": lambda: service.caption([NO_ID]),
        "thumbnail": lambda: service.thumbnail(NO_ID),
        "ask": lambda: service.ask(NO_ID, "what?"),
        "load_image": lambda: service.load_image(NO_ID),
    }
    with pytest.raises(PointNotFound, match=NO_ID):
        calls[operation]()


def test_search_with_captions_writes_each_caption_as_a_field_update_and_never_saves(
    service: Service, indexed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = service.store()
    updates: list[Any] = []
    real_update = store.update_payloads
    monkeypatch.setattr(store, "update_payloads", lambda changes: updates.append(changes) or real_update(changes))
    monkeypatch.setattr(store, "save", fail)
    monkeypatch.setattr(store, "set_payload", fail)
    result = service.search(Query(text="a circle", k=3, captions=True))
    hits = result.hits
    assert all(hit.caption for hit in hits) and len(updates) == 1
    (changes,) = updates
    assert sorted(changes) == sorted(hit.id for hit in hits)
    assert all(list(change.captions) == [result.caption_model] for change in changes.values())
    assert all(not (change.set or change.add or change.remove) for change in changes.values())
    assert service.payload(hits[0].id)["captions"] == hits[0].captions


@pytest.mark.parametrize("workers", [1, 3])
def test_candidates_are_decoded_by_at_most_image_workers_threads(
    shapes_settings: Settings, scenes_folder: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    with Service(shapes_settings.model_copy(update={"image_workers": workers})) as service:
        service.index([scenes_folder])
        container = service.container
        real = container.load_hit_image
        threads: set[str] = set()

        def spy(*args: Any, **kwargs: Any) -> Image.Image:
            threads.add(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(container, "load_hit_image", spy)
        service.search(Query(text="a red circle", k=10, rerank=True, rerank_k=12))
    if workers == 1:
        assert threads == {threading.current_thread().name}
    else:
        assert 1 <= len(threads) <= workers and threading.current_thread().name not in threads


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_search_with_captions_leaves_the_index_files_untouched(
    shapes_settings: Settings, scenes_folder: Path, index_type: str
) -> None:
    """The search path never writes the index: a caption cached by a search is a payload update in SQLite,
    and the service's shutdown saves nothing it did not change (index.faiss and index.json keep bytes and mtime)."""
    settings = shapes_settings.model_copy(update={"index_type": index_type})
    with Service(settings) as service:
        service.index([scenes_folder])
    directory = settings.collections_dir / settings.collection
    files = [directory / "index.faiss", directory / "index.json"]
    # as after a writer that crashed before its save: the index file lags SQLite (a reader catches up in memory)
    meta = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**meta, "generation": meta["generation"] - 1}))
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in files]
    with Service(settings) as service:
        result = service.search(Query(text="a red circle", k=4, captions=True))
        assert all(hit.caption for hit in result.hits)
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in files] == before
    with Service(settings) as service:  # the captions were cached all the same
        assert all(service.payload(hit.id)["captions"] for hit in result.hits)


def test_verified_tags_are_the_candidates_the_generative_model_confirms(
    service: Service, indexed: Path, tmp_path: Path
) -> None:
    """Tagging with verify keeps, per image, those of shapes-clip's candidates that shapes-vlm confirms (its
    vlsearch.json's tag_prompt and tag_threshold); an image whose file is gone is reported and left untouched."""
    from models.shapes_world import COLOURS, SHAPES, read_collection

    labels = tmp_path / "objects.txt"
    labels.write_text("\n".join(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES) + "\n")
    scenes = read_collection(indexed)
    by_path = service.store().ids_by_path([str(path) for path, _ in scenes])
    gone_path, _ = scenes[0]
    gone = by_path[str(gone_path)]
    before = service.store().get([gone])[0].payload
    gone_path.unlink()
    ids = service.point_ids()
    report = service.tag(ids, vocabulary=labels, verify=True)
    assert report.unverified == [gone] and report.scanned == len(ids)
    payloads = {record.id: record.payload for record in service.store().get(ids)}
    assert payloads[gone] == before  # not looked at: not changed
    objects = {by_path[str(path)]: {f"{o.colour} {o.shape}" for o in scene.objects} for path, scene in scenes}
    right = sum(set(payloads[i].get("tags", [])) == objects[i] for i in ids if i != gone)
    assert right >= len(ids) - 3  # exactly its objects, for nearly every image
    unverified = service.tag(ids, vocabulary=labels)  # CLIP alone: more tags, and different ones
    assert unverified.label_counts != report.label_counts
