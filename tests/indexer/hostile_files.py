"""A generated corpus of hostile and odd image files, with what decoding each must give (for any test)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.decode import DecodeLimits
from indexer.errors import CorruptImage, DecodeError, ImageTooLarge, UnreadableFile, UnsupportedImage

Colour = tuple[int, int, int]
RED: Colour = (255, 0, 0)
GREEN: Colour = (0, 160, 0)
BLUE: Colour = (0, 0, 255)
WHITE: Colour = (255, 255, 255)
BLACK: Colour = (0, 0, 0)

# Default pixel limit; a small byte limit so that the over-limit file stays small.
CORPUS_LIMITS = DecodeLimits(max_bytes=1 << 20)


@dataclass(frozen=True)
class HostileFile:
    """One corpus file and its expected outcome under CORPUS_LIMITS with the default white background."""

    name: str
    path: Path
    error: type[DecodeError] | None = None  # the exact error decoding raises; None: it decodes
    format: str | None = None
    size: tuple[int, int] | None = None  # reported (width, height), orientation applied
    probes: tuple[tuple[tuple[int, int], Colour], ...] = ()  # (x, y) in the decoded image -> colour
    tolerance: int = 0  # per channel, for lossy formats
    # What indexing the corpus folder reports instead of `error` (a link leading out of the folder, a name that is
    # not UTF-8): such a file decodes when opened by its path, but the pipeline refuses it.
    index_error: type[DecodeError] | None = None


def build_hostile_corpus(directory: Path) -> dict[str, HostileFile]:
    """Write the corpus into directory (which must exist) and return its files by name; one more file goes beside
    directory (`<directory>-outside.png`), the target of a link leading out of it. Every decodable file has bytes of
    its own, so indexing the folder adds each once."""
    files: list[HostileFile] = []

    def write(name: str, filename: str, data: bytes, **expected: object) -> None:
        path = directory / filename
        path.write_bytes(data)
        files.append(HostileFile(name, path, **expected))  # type: ignore[arg-type]

    # Decodable, each with a trap in its colours, mode or orientation.
    write("cmyk_jpeg", "cmyk.jpg", _encode(_halves(64, 32, RED, BLUE).convert("CMYK"), "JPEG", quality=95),
          format="JPEG", size=(64, 32), probes=(((12, 16), RED), ((52, 16), BLUE)), tolerance=40)
    write("png_16bit_gray", "gray16.png", _encode(gray16_ramp(), "PNG"), format="PNG", size=(256, 4),
          probes=(((0, 1), BLACK), ((128, 1), (128, 128, 128)), ((255, 1), WHITE)))
    write("png_16bit_rgb", "rgb16.png", png_16bit_rgb_halves(), format="PNG", size=(8, 4),
          probes=(((1, 1), RED), ((6, 1), (0, 128, 0))))
    big_endian = np.asarray(gray16_ramp()).astype(">u2").tobytes()
    write("tiff_16bit_big_endian", "gray16be.tiff",
          _encode(Image.frombytes("I;16B", (256, 4), big_endian), "TIFF"), format="TIFF", size=(256, 4),
          probes=(((0, 1), BLACK), ((128, 1), (128, 128, 128)), ((255, 1), WHITE)))
    write("palette_png_transparent", "palette.png", palette_with_transparent_left(), format="PNG",
          size=(32, 16), probes=(((4, 8), WHITE), ((28, 8), RED)))
    write("la_png_half_alpha", "la.png", _encode(Image.new("LA", (16, 16), (0, 128)), "PNG"), format="PNG",
          size=(16, 16), probes=(((8, 8), (127, 127, 127)),), tolerance=1)
    write("animated_gif", "animated.gif", animated_gif([RED, GREEN, BLUE]), format="GIF", size=(16, 16),
          probes=(((8, 8), RED),))
    write("exif_rotated_jpeg", "rotated.jpg", exif_rotated_jpeg(), format="JPEG", size=(32, 64),
          probes=(((24, 8), RED), ((8, 8), BLUE), ((8, 56), BLUE), ((24, 56), BLUE)), tolerance=40)
    write("webp_alpha", "alpha.webp", _encode(_transparent_left(32, 16, GREEN), "WEBP", lossless=True),
          format="WEBP", size=(32, 16), probes=(((4, 8), WHITE), ((28, 8), GREEN)))
    write("tiff_lzw", "image.tiff", _encode(_halves(32, 16, GREEN, RED), "TIFF", compression="tiff_lzw"),
          format="TIFF", size=(32, 16), probes=(((4, 8), GREEN), ((28, 8), RED)))
    write("bmp", "image.bmp", _encode(_halves(32, 16, BLUE, RED), "BMP"), format="BMP", size=(32, 16),
          probes=(((4, 8), BLUE), ((28, 8), RED)))
    write("bmp_1bit", "mono.bmp", _encode(_halves(32, 16, BLACK, WHITE).convert("1"), "BMP"), format="BMP",
          size=(32, 16), probes=(((4, 8), BLACK), ((28, 8), WHITE)))
    write("grayscale_jpeg", "gray.jpg", _encode(Image.new("L", (16, 16), 100), "JPEG"), format="JPEG",
          size=(16, 16), probes=(((8, 8), (100, 100, 100)),), tolerance=2)
    write("png_named_jpg", "really_a_png.jpg", _encode(_halves(32, 16, RED, GREEN), "PNG"), format="PNG",
          size=(32, 16), probes=(((4, 8), RED), ((28, 8), GREEN)))

    write("polyglot_jpeg_zip", "polyglot.jpg", polyglot_jpeg_zip(), format="JPEG", size=(32, 16),
          probes=(((4, 8), BLUE), ((28, 8), RED)), tolerance=40)
    write("jpeg_named_png", "photo.png", _encode(_halves(32, 16, GREEN, BLUE), "JPEG", quality=95), format="JPEG",
          size=(32, 16), probes=(((4, 8), GREEN), ((28, 8), BLUE)), tolerance=40)
    write("webp_named_jpeg", "webp.jpeg", _encode(_halves(32, 16, BLUE, GREEN), "WEBP", lossless=True),
          format="WEBP", size=(32, 16), probes=(((4, 8), BLUE), ((28, 8), GREEN)))
    write("gif_10000_frames", "frames.gif", gif_with_frames(10_000), format="GIF", size=(16, 16),
          probes=(((8, 8), RED),))
    write("tiff_1000_pages", "pages.tiff", tiff_with_pages(1000), format="TIFF", size=(32, 16),
          probes=(((4, 8), GREEN), ((28, 8), RED)))

    # Odd names, each for its own image: they index under exactly these names.
    odd_names = {
        "name_unicode": "café_日本語_🐱.png",
        "name_spaces": " two  spaces .png",
        "name_newline": "line\nbreak.png",
        "name_dot_dot_prefix": "..evil.png",
        "name_dot_dot_inside": "a..b.png",
        "name_like_an_option": "--help.png",
    }
    for shade, (name, filename) in enumerate(odd_names.items()):
        colour = (40 * shade, 90, 200)
        write(name, filename, _encode(_halves(32, 16, colour, WHITE), "PNG"), format="PNG", size=(32, 16),
              probes=(((4, 8), colour), ((28, 8), WHITE)))

    # Not images, or not allowed ones: the extension must not matter.
    write("zero_bytes", "empty.jpg", b"", error=UnsupportedImage)
    write("text_as_jpg", "notes.jpg", b"shopping list: eggs, milk\n", error=UnsupportedImage)
    # A bad file whose name would split a line of the CLI's report or read as rich markup: printed escaped.
    write("text_named_with_newline_and_markup", "todo\n[red]\tlist.jpg", b"call the plumber\n", error=UnsupportedImage)
    write("html_as_jpg", "page.jpg", b"<!DOCTYPE html><html><body>404 not found</body></html>",
          error=UnsupportedImage)
    write("svg_as_png", "drawing.png", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
          error=UnsupportedImage)
    write("pdf_as_jpg", "scan.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", error=UnsupportedImage)
    write("heic_as_jpg", "phone.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(32),
          error=UnsupportedImage)
    write("text_starting_bm", "bmw.bmp", b"BMW 320i: oil change due at 15000 km\n", error=UnsupportedImage)
    # An extension that folders skip (.svg, .heic): refused when opened by path or uploaded.
    write("svg_with_script_and_entity", "vector.svg", SVG_WITH_SCRIPT, error=UnsupportedImage)
    write("heic_without_plugin", "IMG_0001.heic", heic_header(), error=UnsupportedImage)

    # Allowed magic bytes, broken data.
    noisy_jpeg = _encode(noise(128, 128), "JPEG", quality=90)
    write("truncated_jpeg", "truncated.jpg", noisy_jpeg[: len(noisy_jpeg) // 2], error=CorruptImage)
    noisy_png = _encode(noise(64, 64), "PNG")
    write("truncated_png", "truncated.png", noisy_png[: len(noisy_png) // 2], error=CorruptImage)
    write("jpeg_magic_then_garbage", "garbage.jpg", b"\xff\xd8\xff" + _random_bytes(200),
          error=CorruptImage)
    write("png_magic_then_garbage", "garbage.png", b"\x89PNG\r\n\x1a\n" + _random_bytes(200),
          error=CorruptImage)
    write("webp_bad_chunk_length", "bad_length.webp", webp_bad_chunk_length(), error=CorruptImage)

    # Small files that claim huge sizes, and one file over the byte limit.
    write("png_header_20000x20000", "huge_header.png", png_claiming(20000, 20000), error=ImageTooLarge)
    write("jpeg_claiming_60000x60000", "bomb.jpg", jpeg_claiming(60000, 60000), error=ImageTooLarge)
    write("gif_screen_65535x65535", "bomb.gif", gif_claiming(screen=(65535, 65535), frame=(1, 1)),
          error=ImageTooLarge)
    write("gif_frame_beyond_screen", "frame_bomb.gif", gif_claiming(screen=(8, 8), frame=(65535, 65535)),
          error=ImageTooLarge)
    write("webp_canvas_16384x16384", "bomb.webp", webp_vp8x_claiming(16384, 16384), error=ImageTooLarge)
    write("jpeg_claiming_65535x65535", "huge.jpg", jpeg_claiming(65535, 65535), error=ImageTooLarge)
    # Pillow bounds decompressed metadata (PngImagePlugin.MAX_TEXT_CHUNK a chunk, MAX_TEXT_MEMORY in all).
    metadata_bomb = zlib.compress(bytes(16 << 20), 9)  # 16 MiB of zeros in 16 KB
    write("png_iccp_bomb", "icc_bomb.png", png_with_chunks(_chunk(b"iCCP", b"sRGB\x00\x00" + metadata_bomb)),
          error=ImageTooLarge)
    write("png_ztxt_bomb", "ztxt_bomb.png", png_with_chunks(_chunk(b"zTXt", b"Comment\x00\x00" + metadata_bomb)),
          error=ImageTooLarge)
    megabyte = zlib.compress(bytes(1_000_000), 9)  # under MAX_TEXT_CHUNK; 68 of them pass MAX_TEXT_MEMORY
    texts = b"".join(_chunk(b"zTXt", b"note%d\x00\x00" % i + megabyte) for i in range(68))
    write("png_ztxt_chunks_past_text_memory", "many_texts.png", png_with_chunks(texts), error=ImageTooLarge)
    over_limit = _encode(noise(620, 620), "PNG", compress_level=1)
    assert len(over_limit) > CORPUS_LIMITS.max_bytes
    write("png_over_byte_limit", "big.png", over_limit, error=ImageTooLarge)

    # Paths that are not readable regular files.
    def add(name: str, filename: str, make: Callable[[Path], None], error: type[DecodeError]) -> None:
        path = directory / filename
        make(path)
        files.append(HostileFile(name, path, error=error))

    add("symlink_loop", "loop.jpg", lambda p: p.symlink_to(p.name), UnreadableFile)
    add("dangling_symlink", "gone.jpg", lambda p: p.symlink_to("does-not-exist.jpg"), UnreadableFile)
    add("directory_named_jpg", "x.jpg", lambda p: p.mkdir(), UnsupportedImage)
    if hasattr(os, "mkfifo"):
        add("fifo_named_jpg", "pipe.jpg", lambda p: os.mkfifo(p), UnsupportedImage)

    # Links, permissions, raw-byte names: each leads to an image of its own, decoded when opened by its path.
    def good(name: str, path: Path, left: Colour, right: Colour, index_error: type[DecodeError] | None = None) -> None:
        probes = (((4, 8), left), ((28, 8), right))
        files.append(HostileFile(name, path, format="PNG", size=(32, 16), probes=probes, index_error=index_error))

    outside = directory.with_name(f"{directory.name}-outside.png")
    outside.write_bytes(_encode(_halves(32, 16, RED, BLACK), "PNG"))
    (directory / "outside.png").symlink_to(outside)
    good("symlink_outside_folder", directory / "outside.png", RED, BLACK, index_error=UnreadableFile)
    (directory / "link_target.dat").write_bytes(_encode(_halves(32, 16, BLACK, GREEN), "PNG"))  # folders skip it
    (directory / "inside_link.png").symlink_to("link_target.dat")
    good("symlink_inside_folder", directory / "inside_link.png", BLACK, GREEN)
    locked = directory / "locked.png"
    locked.write_bytes(_encode(_halves(32, 16, GREEN, BLACK), "PNG"))
    locked.chmod(0)
    if _can_open(locked):  # root (as CI runs) reads a file of mode 000 all the same: for root it is a good image
        good("unreadable_file", locked, GREEN, BLACK)
    else:
        files.append(HostileFile("unreadable_file", locked, error=UnreadableFile))
    not_utf8 = Path(os.fsdecode(os.fsencode(directory) + b"/bad\xffname.png"))
    try:
        not_utf8.write_bytes(_encode(_halves(32, 16, WHITE, BLUE), "PNG"))
    except (OSError, UnicodeError):  # a file system that takes UTF-8 names only
        pass
    else:
        good("name_not_utf8", not_utf8, WHITE, BLUE, index_error=UnreadableFile)

    return {f.name: f for f in files}


def gray16_ramp() -> Image.Image:
    """256x4 16-bit grayscale where column x holds x*257, whose top 8 bits are x."""
    row = np.arange(256, dtype=np.uint16) * 257
    return Image.fromarray(np.tile(row, (4, 1)))


def palette_with_transparent_left() -> bytes:
    """32x16 palette PNG: left half is index 0 (black, fully transparent), right half index 1 (red)."""
    image = Image.new("P", (32, 16), 0)
    image.putpalette([*BLACK, *RED])
    image.paste(1, (16, 0, 32, 16))
    return _encode(image, "PNG", transparency=0)


def animated_gif(colours: list[Colour]) -> bytes:
    """A 16x16 GIF with one solid frame per colour."""
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(size: tuple[int, int] = (64, 32), marker: int = 16) -> bytes:
    """A blue JPEG stored landscape with a red marker at the stored top-left, EXIF orientation 6.

    Orientation 6 means 'turn 90° clockwise to display': the marker must end up top-right.
    """
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, marker, marker))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", quality=95, exif=exif.tobytes())


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height RGB but whose IDAT holds one short row."""
    return _png(width, height, bit_depth=8, colour_type=2, scanlines=bytes(64))


def png_16bit_rgb_halves() -> bytes:
    """8x4 RGB PNG, 16 bits per channel (Pillow cannot write one): left half red, right half (0, 0x8080, 0)."""
    row = b"\x00" + bytes.fromhex("ffff00000000") * 4 + bytes.fromhex("000080800000") * 4
    return _png(8, 4, bit_depth=16, colour_type=2, scanlines=row * 4)


def png_with_chunks(chunks: bytes) -> bytes:
    """A 32x16 PNG (red left, blue right) with chunks inserted right after its IHDR."""
    data = _encode(_halves(32, 16, RED, BLUE), "PNG")
    after_header = 8 + 8 + 13 + 4  # signature, then IHDR's length and type, body and CRC
    assert data[12:16] == b"IHDR"
    return data[:after_header] + chunks + data[after_header:]


def _png(width: int, height: int, bit_depth: int, colour_type: int, scanlines: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(scanlines))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), GREEN), "JPEG"))
    offset = 2
    while data[offset + 1] != 0xC0:  # walk the marker segments up to SOF0
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    data[offset + 5 : offset + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A one-colour GIF with the given logical screen size and first-frame size (both may lie)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes((*RED, *BLACK))
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    pixels = b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one sub-block: clear, index 0, end
    return header + descriptor + pixels + b";"


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """A WebP container whose VP8X chunk claims a width x height canvas (no image data follows)."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def polyglot_jpeg_zip() -> bytes:
    """A 32x16 JPEG (blue left, red right) with a ZIP archive appended: a valid ZIP too (its directory is at the
    end, where ZIP readers look), holding a shell script."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    data = _encode(_halves(32, 16, BLUE, RED), "JPEG", quality=95) + archive.getvalue()
    assert zipfile.is_zipfile(io.BytesIO(data))
    return data


def gif_with_frames(count: int) -> bytes:
    """A 16x16 GIF: a red first frame, then count - 1 one-pixel frames of 0.1 s each. Written as bytes, 23 a frame:
    Pillow's writer merges identical frames."""
    data = _encode(Image.new("RGB", (16, 16), RED), "GIF")
    assert data.endswith(b";") and data[10] & 0x80  # a global colour table, which the one-pixel frames use
    control = b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # graphic control: keep the frame, 10/100 s
    frame = control + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return data[:-1] + frame * (count - 1) + b";"


def tiff_with_pages(count: int) -> bytes:
    """A TIFF whose first page is 32x16 (green left, red right), then count - 1 one-pixel gray pages, each an IFD
    of its own. Written as bytes: Pillow's writer takes about a second for 1,000 pages."""
    data = bytearray(_encode(_halves(32, 16, GREEN, RED), "TIFF"))
    assert data[:4] == b"II*\x00"
    first = struct.unpack_from("<I", data, 4)[0]
    next_at = first + 2 + 12 * struct.unpack_from("<H", data, first)[0]
    assert struct.unpack_from("<I", data, next_at)[0] == 0  # a single page so far
    data += b"\x00" * (len(data) % 2)  # IFDs start on a word boundary
    # width, height, bits per sample, no compression, black is zero, strip offset, samples, rows, strip bytes
    tags = ((256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, None), (277, 1), (278, 1), (279, 1))
    size = 2 + 12 * len(tags) + 4 + 2  # the entries, the next pointer, then the page's one pixel and a pad byte
    for _ in range(1, count):
        start = len(data)
        struct.pack_into("<I", data, next_at, start)
        entries = b"".join(
            struct.pack("<HHII", tag, 4, 1, start + size - 2 if value is None else value) for tag, value in tags
        )
        data += struct.pack("<H", len(tags)) + entries + bytes(4) + b"\x80\x00"
        next_at = start + 2 + 12 * len(tags)
    return bytes(data)


def webp_bad_chunk_length() -> bytes:
    """A lossless 32x16 WebP whose VP8L chunk claims 4 GiB less 16 bytes (its RIFF size is left as it was)."""
    data = bytearray(_encode(_halves(32, 16, RED, GREEN), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    data[16:20] = struct.pack("<I", 0xFFFFFFF0)
    return bytes(data)


def heic_header() -> bytes:
    """The start of an iPhone HEIC: an ftyp box (brand heic) and a meta box (no Pillow plugin reads it here)."""
    ftyp = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic"
    meta = struct.pack(">I", 33) + b"meta" + bytes(4) + struct.pack(">I", 21) + b"hdlr" + bytes(8) + b"pict\x00"
    return ftyp + meta + bytes(64)


SVG_WITH_SCRIPT = (
    b'<?xml version="1.0"?>\n<!DOCTYPE svg [<!ENTITY secret SYSTEM "file:///etc/passwd">]>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000" onload="alert(1)">'
    b"<script>fetch('/v1/keys')</script><text>&secret;</text></svg>\n"
)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels (incompressible, so its files are as large as they get)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _halves(width: int, height: int, left: Colour, right: Colour) -> Image.Image:
    image = Image.new("RGB", (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def _transparent_left(width: int, height: int, right: Colour) -> Image.Image:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    image.paste((*right, 255), (width // 2, 0, width, height))
    return image


def _can_open(path: Path) -> bool:
    try:
        path.open("rb").close()
    except PermissionError:
        return False
    return True


def _random_bytes(count: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)  # type: ignore[arg-type]
    return buffer.getvalue()
