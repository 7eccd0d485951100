"""The payload's `taken`: EXIF DateTimeOriginal when present, else the file's mtime (UTC), never a failed file."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from core.container import Container
from indexer.pipeline import index_images
from indexer.sources import ImageBytes, iter_sources
from tests.conftest import draw_scene

MTIME = 1_700_000_000  # 2023-11-14T22:13:20 UTC


def jpeg(exif: Image.Exif | None = None) -> bytes:
    buffer = io.BytesIO()
    draw_scene(3).save(buffer, "JPEG", **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    draw_scene(4).save(buffer, "PNG")
    return buffer.getvalue()


def with_corrupt_exif(data: bytes) -> bytes:
    """An APP1 "Exif" segment of garbage right after SOI: the pixels are intact, the EXIF cannot be read."""
    body = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xf0garbage" * 3
    return data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def test_taken_is_exif_datetime_original_else_the_mtime(container: Container, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2021:06:01 12:34:56"
    (folder / "exif.jpg").write_bytes(jpeg(exif))
    (folder / "plain.jpg").write_bytes(jpeg())
    (folder / "corrupt.jpg").write_bytes(with_corrupt_exif(jpeg()))
    bad_time = Image.Exif()
    bad_time.get_ifd(0x8769)[36867] = "0000:00:00 00:00:00"  # what some cameras write when the clock is unset
    (folder / "unset.jpg").write_bytes(jpeg(bad_time))
    for path in folder.iterdir():
        os.utime(path, (MTIME, MTIME))
    encoder = container.encoder()
    store = container.create_or_open_store("taken", encoder)
    report = index_images(iter_sources([folder]), encoder, store, batch_size=2, workers=2)
    assert not report.failed  # a broken EXIF block never fails its file
    taken = {Path(record.payload["paths"][0]).name: record.payload["taken"] for record in store.scroll()}
    assert taken == {
        "exif.jpg": "2021-06-01T12:34:56",
        "plain.jpg": "2023-11-14T22:13:20",
        "corrupt.jpg": "2023-11-14T22:13:20",
        "unset.jpg": "2023-11-14T22:13:20",
    }


def test_bytes_have_their_exif_time_else_the_time_of_indexing(container: Container) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2019:12:31 23:59:59"
    encoder = container.encoder()
    store = container.create_or_open_store("taken-bytes", encoder)
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    sources = [ImageBytes("upload.jpg", jpeg(exif)), ImageBytes("plain.png", png())]
    report = index_images(sources, encoder, store, blobs=container.blobs)
    after = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert not report.failed
    taken = {record.payload["source_name"]: record.payload["taken"] for record in store.scroll()}
    assert taken["upload.jpg"] == "2019-12-31T23:59:59"
    assert before <= taken["plain.png"] <= after
