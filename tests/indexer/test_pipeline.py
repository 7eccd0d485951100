"""The indexing pipeline on a tiny open_clip model (random weights: these tests are about bookkeeping, not quality)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.container import Container
from indexer.pipeline import content_id, index_images
from indexer.sources import ImageBytes, iter_sources
from retriever.errors import EncoderMismatch
from retriever.store import VectorStore
from tests.conftest import draw_scene


def run_index(container: Container, *paths: Path, collection: str = "photos"):
    encoder = container.encoder()
    store = container.create_or_open_store(collection, encoder)
    report = index_images(iter_sources(paths), encoder, store, batch_size=3, workers=2)
    return report, store


def all_paths(store: VectorStore) -> dict[str, list[str]]:
    return {record.id: record.payload["paths"] for record in store.scroll()}


def test_index_embeds_every_image_with_a_normalised_vector(container: Container, image_folder: Path) -> None:
    report, store = run_index(container, image_folder)
    assert (report.files, report.added, report.failed) == (8, 8, [])
    assert store.count() == 8
    records = store.scroll(with_vectors=True)
    for record in records:
        assert record.vector is not None and record.vector.dtype == np.float32
        assert abs(float(np.linalg.norm(record.vector)) - 1.0) < 1e-4
        path = Path(record.payload["paths"][0])
        assert record.id == content_id(path.read_bytes())
        assert record.payload["bytes"] == path.stat().st_size
        assert (record.payload["width"], record.payload["height"]) in {(96, 80), (160, 120)}


def test_reindex_of_unchanged_folder_adds_nothing(container: Container, image_folder: Path) -> None:
    run_index(container, image_folder)[1].close()
    report, store = run_index(container, image_folder)
    assert (report.added, report.duplicates, report.unchanged, report.removed) == (0, 0, 8, 0)
    assert store.count() == 8


def test_exact_duplicate_is_recorded_as_second_path_of_same_image(container: Container, image_folder: Path) -> None:
    original = image_folder / "trip" / "img1.png"
    copy = image_folder / "home" / "copy-of-img1.png"
    shutil.copy(original, copy)
    report, store = run_index(container, image_folder)
    assert (report.files, report.added, report.duplicates) == (9, 8, 1)
    assert store.count() == 8
    paths = all_paths(store)[content_id(original.read_bytes())]
    assert sorted(paths) == sorted([str(original), str(copy)])


def test_duplicate_added_later_joins_the_stored_image(container: Container, image_folder: Path) -> None:
    run_index(container, image_folder)[1].close()
    shutil.copy(image_folder / "home" / "img5.png", image_folder / "img5-again.png")
    report, store = run_index(container, image_folder)
    assert (report.added, report.duplicates, report.unchanged) == (0, 1, 8)
    assert len(all_paths(store)[content_id((image_folder / "home" / "img5.png").read_bytes())]) == 2


def test_changed_file_is_re_embedded_and_its_old_image_removed(container: Container, image_folder: Path) -> None:
    run_index(container, image_folder)[1].close()
    target = image_folder / "trip" / "img2.png"
    old_id = content_id(target.read_bytes())
    draw_scene(1000).save(target)
    report, store = run_index(container, image_folder)
    assert (report.added, report.removed, report.unchanged) == (1, 1, 7)
    assert store.count() == 8
    assert store.get([old_id]) == []
    assert all_paths(store)[content_id(target.read_bytes())] == [str(target)]


def test_bad_files_fail_alone_and_the_run_goes_on(container: Container, image_folder: Path) -> None:
    (image_folder / "notes.jpg").write_text("this is not an image")
    (image_folder / "empty.png").write_bytes(b"")
    good = (image_folder / "trip" / "img0.jpg").read_bytes()
    (image_folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    report, store = run_index(container, image_folder)
    failed = {Path(f.path).name: f.error for f in report.failed}
    assert failed == {"notes.jpg": "UnsupportedImage", "empty.png": "UnsupportedImage", "truncated.jpg": "CorruptImage"}
    assert all(f.reason for f in report.failed)
    assert report.added == 8 and store.count() == 8


def test_collection_of_one_encoder_refuses_another(
    container: Container, image_folder: Path, other_checkpoint: Path
) -> None:
    run_index(container, image_folder)[1].close()
    other = container.encoder("tiny-vit", str(other_checkpoint))
    with pytest.raises(EncoderMismatch, match="tiny-vit"):
        container.create_or_open_store("photos", other)


class NoScroll:
    """A store that refuses to be read whole: the pipeline must look its sources up by path and id."""

    def __init__(self, store: VectorStore) -> None:
        self._store = store

    def scroll(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline read the whole collection")

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_reindexing_looks_sources_up_and_never_reads_the_whole_collection(
    container: Container, image_folder: Path
) -> None:
    _, store = run_index(container, image_folder)
    shutil.copy(image_folder / "home" / "img5.png", image_folder / "img5-again.png")
    draw_scene(2000).save(image_folder / "trip" / "img2.png")
    report = index_images(iter_sources([image_folder]), container.encoder(), NoScroll(store), batch_size=3, workers=2)  # type: ignore[arg-type]
    assert (report.added, report.duplicates, report.removed, report.unchanged) == (1, 1, 1, 7)
    assert store.count() == 8


def test_an_image_stored_meanwhile_by_another_process_keeps_its_path_and_gains_ours(
    container: Container, image_folder: Path
) -> None:
    """Two writers index the same bytes at once: the later one must not replace the earlier one's payload."""
    encoder = container.encoder()
    store = container.create_or_open_store("photos", encoder)
    other = container.open_store("photos")  # another process's view of the collection
    ours = image_folder / "trip" / "img0.jpg"
    elsewhere = "/elsewhere/img0-copy.jpg"
    image_id = content_id(ours.read_bytes())

    def the_other_process_stores_it() -> None:  # after our lookup, before our write
        from PIL import Image

        if not other.get([image_id]):
            vector = encoder.encode_pil([Image.open(ours).convert("RGB")])
            other.upsert([image_id], vector, [{"paths": [elsewhere], "width": 1, "height": 1}])

    report = index_images([ours], encoder, store, batch_size=8, workers=1, on_file=the_other_process_stores_it)
    assert (report.added, report.duplicates) == (0, 1)
    (record,) = store.get([image_id])
    assert sorted(record.payload["paths"]) == sorted([elsewhere, str(ours)])
    other.close()


def test_a_file_rewritten_while_it_is_read_fails_alone(
    container: Container, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import indexer.decode as decode

    target = image_folder / "home" / "img6.jpg"
    real_read = decode._read_at_most

    def read_while_a_writer_rewrites(fd: int, expected: int, limit: int) -> bytes:
        data = real_read(fd, expected, limit)
        if os.path.samefile(f"/proc/self/fd/{fd}", target):
            with open(target, "ab") as file:  # another program appends to the file meanwhile
                file.write(b"\0" * 100)
        return data

    monkeypatch.setattr(decode, "_read_at_most", read_while_a_writer_rewrites)
    report, store = run_index(container, image_folder)
    assert [(Path(f.path), f.error, f.reason) for f in report.failed] == [
        (target, "UnreadableFile", "changed while it was read")
    ]
    assert report.added == 7 and store.count() == 7


class Blobs:
    def __init__(self) -> None:
        self.kept: dict[str, bytes] = {}

    def put(self, image_id: str, data: bytes) -> str:
        self.kept[image_id] = data
        return image_id


def test_bytes_and_files_of_one_image_make_one_image_with_its_path_and_kept_bytes(
    container: Container, image_folder: Path
) -> None:
    file = image_folder / "trip" / "img1.png"
    data = file.read_bytes()
    other = (image_folder / "trip" / "img3.jpg").read_bytes()
    blobs = Blobs()
    encoder = container.encoder()
    store = container.create_or_open_store("photos", encoder)
    sources = [ImageBytes("upload.png", data), file, ImageBytes("other.png", other), ImageBytes("again.png", data)]
    report = index_images(sources, encoder, store, batch_size=8, workers=2, blobs=blobs)
    assert (report.files, report.added, report.duplicates, report.unchanged) == (4, 2, 1, 1)
    (record,) = store.get([content_id(data)])
    assert record.payload["paths"] == [str(file)]
    assert (record.payload["blob"], record.payload["source_name"]) == (content_id(data), "upload.png")
    assert store.get([content_id(other)])[0].payload["paths"] == []
    assert set(blobs.kept) == {content_id(data), content_id(other)}


def test_bytes_without_a_place_to_keep_them_fail_alone(container: Container, image_folder: Path) -> None:
    encoder = container.encoder()
    store = container.create_or_open_store("photos", encoder)
    data = (image_folder / "trip" / "img1.png").read_bytes()
    report = index_images([ImageBytes("upload.png", data), image_folder / "trip" / "img3.jpg"], encoder, store)
    assert [(f.path, f.error) for f in report.failed] == [("upload.png", "UnsupportedImage")] and report.added == 1
