"""The indexing pipeline on a tiny open_clip model (random weights: these tests are about bookkeeping, not quality)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core.container import Container
from indexer.pipeline import content_id, index_images
from indexer.sources import iter_sources
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
