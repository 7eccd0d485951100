"""Image bytes that vlsearch keeps under the data dir: images indexed from bytes (content-addressed blobs, so that
rerank, captions and thumbnails can load them again) and cached thumbnails.

Files are written atomically under a name unique to the writer (pid and a random part), then renamed into place;
a writer only ever removes its own temporary file, so processes writing the same blob at once never disturb
each other, and a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from retriever.errors import InvalidQuery

BLOBS_DIR = "blobs"
THUMBNAILS_DIR = "thumbnails"
MIN_THUMBNAIL_SIDE = 16
MAX_THUMBNAIL_SIDE = 1024
THUMBNAIL_QUALITY = 85
_IMAGE_ID = re.compile(r"[0-9a-f]{8,64}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file of this writer's own, fsynced, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()  # ours alone: the name is unique to this call
        raise


def checked_image_id(image_id: str) -> str:
    """An image id as the pipeline makes them (hex of a content hash); anything else could name another file."""
    if not _IMAGE_ID.fullmatch(image_id):
        raise InvalidQuery(f"{image_id!r} is not an image id (hex digits of a content hash)")
    return image_id


class BlobStore:
    """Bytes of images indexed from bytes, at `root/<first two hex digits>/<id>`; shared by all collections (the
    same bytes have the same id everywhere)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_id: str) -> Path:
        checked_image_id(image_id)
        return self.root / image_id[:2] / image_id

    def put(self, image_id: str, data: bytes) -> str:
        """Keep data under image_id (a no-op when it is kept already); returns the reference for the payload."""
        path = self.path(image_id)
        try:
            if path.stat().st_size == len(data):
                return image_id
        except FileNotFoundError:
            pass
        write_atomically(path, data)
        return image_id

    def find(self, reference: str) -> Path | None:
        """The file of a payload's `blob` reference, when it exists."""
        try:
            path = self.path(reference)
        except InvalidQuery:
            return None
        return path if path.is_file() else None


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG of an image, its longest side at most `side` (never enlarged), and where it is cached."""

    image_id: str
    side: int
    path: Path
    data: bytes
    width: int
    height: int
    media_type: str = "image/jpeg"


def check_thumbnail_side(side: int) -> int:
    if not MIN_THUMBNAIL_SIDE <= side <= MAX_THUMBNAIL_SIDE:
        raise InvalidQuery(f"thumbnail side must be between {MIN_THUMBNAIL_SIDE} and {MAX_THUMBNAIL_SIDE}, got {side}")
    return side


def encode_thumbnail(image: Image.Image, side: int) -> tuple[bytes, int, int]:
    """image scaled down (aspect kept) so that its longest side is at most side, as JPEG bytes, and its size."""
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return buffer.getvalue(), small.width, small.height


class ThumbnailCache:
    """Thumbnails at `root/<side>/<first two hex digits>/<id>.jpg`, made once and then read from disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_id: str, side: int) -> Path:
        checked_image_id(image_id)
        return self.root / str(check_thumbnail_side(side)) / image_id[:2] / f"{image_id}.jpg"

    def cached(self, image_id: str, side: int) -> Thumbnail | None:
        path = self.path(image_id, side)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as opened:
                width, height = opened.size
        except Exception:  # a damaged cache entry is made again
            return None
        return Thumbnail(image_id, side, path, data, width, height)

    def store(self, image_id: str, side: int, image: Image.Image) -> Thumbnail:
        data, width, height = encode_thumbnail(image, side)
        path = self.path(image_id, side)
        write_atomically(path, data)
        return Thumbnail(image_id, side, path, data, width, height)
