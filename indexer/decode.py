"""Safe image decoding: every path in vlsearch turns a file or bytes into an RGB PIL image here."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import (  # noqa: F401  (importing a plugin registers it, so Image.open never loads other formats)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from indexer.errors import CorruptImage, DecodeError, ImageTooLarge, UnreadableFile, UnsupportedImage
from indexer.payloads import taken_form

# DecodeLimits.max_pixels is the limit. Pillow's own check is process-wide (it cannot follow per-call limits
# from a thread pool) and only warns between 1x and 2x its threshold, so it is switched off once, here.
Image.MAX_IMAGE_PIXELS = None

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER .. BITMAPV5HEADER
_HEAD_BYTES = 32  # enough for every magic number below and the WebP canvas size
_EXIF_IFD = 0x8769  # the Exif sub-IFD of IFD0
# In it: when the picture was taken, "YYYY:MM:DD HH:MM:SS". IFD0's DateTime (306) is not a fallback: it is when the
# file was last changed, rewritten by every editor that saves it, so it says no more than the file's mtime.
_DATETIME_ORIGINAL = 36867
_EXIF_TIME = "%Y:%m:%d %H:%M:%S"
_METADATA_BOMB = (
    f"PNG metadata (text or ICC profile chunks) decompresses past {PngImagePlugin.MAX_TEXT_CHUNK >> 20} MiB a chunk "
    f"or {PngImagePlugin.MAX_TEXT_MEMORY >> 20} MiB in all: refused as a decompression bomb"
)


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse inputs over these sizes; pixels are counted from the header, before pixel data is decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"decode limits must be positive: max_bytes={self.max_bytes}, "
                             f"max_pixels={self.max_pixels}")


@dataclass
class DecodedImage:
    """A loaded RGB image (orientation applied) and the size and format of the original file."""

    image: Image.Image  # mode "RGB"; may be draft-reduced, so use width/height for the original size
    width: int  # of the original image, after orientation
    height: int
    format: str  # "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"
    taken: str | None = None  # EXIF DateTimeOriginal in the payload's `taken` form, when present and valid


def sniff_format(head: bytes) -> str | None:
    """The allowed format named by the magic bytes at the start of head (32 bytes suffice), else None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    # "BM" alone matches plain text ("BMW ..."), so the DIB header size must be one Pillow reads too.
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # classic and BigTIFF
        return "TIFF"
    return None



CHANGED_WHILE_READ = "changed while it was read"


def read_image_file(path: Path, limits: DecodeLimits) -> bytes:
    """Read a regular file of at most limits.max_bytes; the size is checked (fstat) before reading."""
    return read_image(path, limits)[0]


def read_image(path: Path, limits: DecodeLimits) -> tuple[bytes, os.stat_result]:
    """read_image_file, with the file's status from before the read (size, mtime).

    A file whose size or mtime differs after the read (a writer was rewriting it) is refused as UnreadableFile
    "changed while it was read": its bytes may mix two versions.
    """
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer (it is then refused as not regular).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise UnreadableFile(path, _os_reason(error)) from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsupportedImage(path, f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > limits.max_bytes:
            raise _too_many_bytes(path, info.st_size, limits)
        data = _read_at_most(fd, info.st_size, limits.max_bytes)
        after = os.fstat(fd)
    except OSError as error:
        raise UnreadableFile(path, _os_reason(error)) from error
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(path, len(data), limits)
    if len(data) != info.st_size or (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
        raise UnreadableFile(path, CHANGED_WHILE_READ)
    return data, info


def check_image_bytes(data: bytes, source: str | Path, limits: DecodeLimits) -> bytes:
    """Refuse bytes (an upload, a fetched image) over limits.max_bytes before anything else reads them."""
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(source, len(data), limits)
    return data


def decode_image(
    data: bytes,
    source: str | Path = "<bytes>",
    limits: DecodeLimits = DecodeLimits(),
    draft_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> DecodedImage:
    """Decode bytes of an allowed format into a loaded RGB image; errors are DecodeError subclasses."""
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be >= 1, got {draft_size}")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(source, len(data), limits)
    head = data[:_HEAD_BYTES]
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedImage(source, _describe_unsupported(data[:512]))
    if fmt == "WEBP":
        _check_webp_canvas(head, source, limits)  # Pillow allocates the WebP canvas while opening
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as opened:
            width, height = opened.size
            if width < 1 or height < 1:
                raise CorruptImage(source, f"{fmt} header gives an empty size {width}x{height}")
            _check_pixels(width, height, source, limits)
            if draft_size is not None and fmt == "JPEG":
                # Scales by 1/2, 1/4 or 1/8 while keeping both sides >= draft_size, so the shorter one is too.
                opened.draft("RGB", (draft_size, draft_size))
            opened.load()
            stored_size = opened.size
            taken = exif_taken(opened)
            _apply_orientation(opened)
            if opened.size != stored_size:  # turned by 90 degrees
                width, height = height, width
            rgb = _to_rgb(opened, background, source)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as error:
        raise CorruptImage(source, f"{fmt} header could not be parsed") from error
    except Image.DecompressionBombError as error:  # only if someone re-enabled Pillow's check
        raise ImageTooLarge(source, str(error)) from error
    except MemoryError as error:
        raise ImageTooLarge(source, f"out of memory decoding this {fmt}") from error
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, EOFError...
        if isinstance(error, ValueError) and "MAX_TEXT_" in str(error):  # PngImagePlugin's bounds on metadata
            raise ImageTooLarge(source, _METADATA_BOMB) from error
        raise CorruptImage(source, f"broken {fmt} data: {error}") from error
    return DecodedImage(image=rgb, width=width, height=height, format=fmt, taken=taken)


def load_image(
    path: Path,
    limits: DecodeLimits = DecodeLimits(),
    draft_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> DecodedImage:
    """Read and decode one image file (read_image_file then decode_image)."""
    return decode_image(read_image_file(path, limits), path, limits, draft_size, background)


def exif_taken(image: Image.Image) -> str | None:
    """EXIF DateTimeOriginal (tag 36867 of the Exif IFD) as "YYYY-MM-DDTHH:MM:SS"; None when it is missing,
    not a valid "YYYY:MM:DD HH:MM:SS" time, or the EXIF cannot be read (never an error: the pixels still count)."""
    try:
        value = image.getexif().get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL)
        if isinstance(value, bytes):
            value = value.decode("ascii")
        if not isinstance(value, str):
            return None
        return taken_form(datetime.strptime(value.strip("\x00 ")[:19], _EXIF_TIME))
    except Exception:
        return None


def _apply_orientation(image: Image.Image) -> None:
    # Unreadable EXIF should not lose a readable image: keep the pixels as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


def _to_rgb(image: Image.Image, background: tuple[int, int, int], source: str | Path) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's conversion to L clips at 255 (a 16-bit image turns white); keep the top 8 bits instead.
        # Mode I (32-bit) comes from 16-bit sources too, so it is read on the same 0..65535 scale.
        # A 16-bit colour key (tRNS) is ignored: converting to RGBA first would clip as well.
        wide = np.asarray(image).astype(np.int64)
        narrow = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(narrow).convert("RGB")  # 2-D uint8 -> mode L
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode == "RGB":
        # No copy (a 12-Mpixel copy costs as much as a draft decode); the loaded file object keeps only
        # a reference to the compressed bytes, which are smaller than its pixels.
        return image
    try:
        return image.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), LAB, YCbCr, F...
    except ValueError as error:
        raise UnsupportedImage(source, f"colour mode {image.mode} cannot be converted to RGB") from error


def _check_pixels(width: int, height: int, source: str | Path, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            source,
            f"{width}x{height} = {width * height} pixels is over the limit of "
            f"{limits.max_pixels} (max_pixels)",
        )


def _check_webp_canvas(head: bytes, source: str | Path, limits: DecodeLimits) -> None:
    size = _webp_canvas_size(head)
    if size is None:
        raise CorruptImage(source, "WebP header has no readable canvas size (VP8, VP8L or VP8X chunk)")
    _check_pixels(*size, source, limits)


def _webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from the first WebP chunk (RIFF container, then VP8 / VP8L / VP8X), or None."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _too_many_bytes(source: str | Path, size: int, limits: DecodeLimits) -> ImageTooLarge:
    if size == limits.max_bytes + 1:  # what a read bounded at the limit returns (an upload): the size is unknown
        return ImageTooLarge(source, f"more than {limits.max_bytes} bytes, the limit (max_bytes)")
    return ImageTooLarge(source, f"{size} bytes is over the limit of {limits.max_bytes} (max_bytes)")


# Known formats we refuse, named so the user learns what the file really is.
_REFUSED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"8BPS", "a Photoshop PSD"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"PK\x03\x04", "a ZIP archive"),
)


def _describe_unsupported(head: bytes) -> str:
    if not head:
        return "empty file"
    for signature, name in _REFUSED_SIGNATURES:
        if head.startswith(signature):
            return f"{name}, not an allowed image format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
    if head[4:8] == b"ftyp":  # ISO media: HEIC, AVIF, MP4
        brand = head[8:12].decode("ascii", "replace")
        return f"an ISO media file (brand {brand!r}, e.g. HEIC/AVIF), not an allowed image format"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing (vector images are not supported)"
    if b"\x00" not in head and _is_text(head):
        return "text, not an image"
    return f"unknown format (first bytes {head[:8].hex(' ')})"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:  # a multi-byte character cut by the end of head is still text
        return error.start >= len(head) - 3
    return True


def _read_at_most(fd: int, expected: int, limit: int) -> bytes:
    """Read to the end, or stop once past limit; one byte more than expected reveals a file that grew."""
    chunks: list[bytes] = []
    total = 0
    want = expected + 1
    while total <= limit:
        chunk = os.read(fd, min(want, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = 1 << 20
    return b"".join(chunks)  # no copy for the usual single chunk


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"
