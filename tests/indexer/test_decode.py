"""Safe decoding: hostile files fail with typed errors, odd but valid ones decode with the right pixels."""

from __future__ import annotations

import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.decode import DecodedImage, DecodeLimits, decode_image, load_image, read_image_file, sniff_format
from indexer.errors import CorruptImage, DecodeError, ImageTooLarge, UnsupportedImage, VlsearchError
from tests.indexer.hostile_files import (
    BLUE,
    CORPUS_LIMITS,
    RED,
    WHITE,
    HostileFile,
    build_hostile_corpus,
    exif_rotated_jpeg,
    jpeg_claiming,
    noise,
    palette_with_transparent_left,
    png_claiming,
)

# A regression here tends to hang (a FIFO opened blocking) rather than fail: bound every test.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostileFile]:
    return build_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 4000x3000 photo-like JPEG (noise blocks, so the decoder has real work)."""
    image = noise(400, 300).resize((4000, 3000), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def assert_decoded_as_expected(expected: HostileFile, decoded: DecodedImage) -> None:
    assert decoded.image.mode == "RGB"
    assert decoded.format == expected.format
    assert (decoded.width, decoded.height) == expected.size
    assert decoded.image.size == expected.size  # no draft requested
    for (x, y), colour in expected.probes:
        actual = decoded.image.getpixel((x, y))
        assert isinstance(actual, tuple)
        assert all(abs(a - c) <= expected.tolerance for a, c in zip(actual, colour, strict=True)), (
            f"{expected.name} at {(x, y)}: {actual} != {colour}"
        )


def _close(actual: object, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(a - c) <= tolerance for a, c in zip(actual, colour, strict=True))


def test_whole_corpus_decodes_or_raises_its_typed_error(corpus: dict[str, HostileFile]) -> None:
    assert len(corpus) >= 15
    assert sum(f.error is None for f in corpus.values()) >= 10
    wrong: list[str] = []
    for expected in corpus.values():
        try:
            decoded = load_image(expected.path, CORPUS_LIMITS)
        except DecodeError as error:  # anything else escapes and fails the test
            if type(error) is not expected.error:
                wrong.append(f"{expected.name}: {type(error).__name__} ({error}), wanted {expected.error}")
            assert error.source == str(expected.path)
            assert error.reason
        else:
            if expected.error is not None:
                wrong.append(f"{expected.name}: decoded, wanted {expected.error.__name__}")
            else:
                assert_decoded_as_expected(expected, decoded)
    assert wrong == []


def test_exif_orientation_6_swaps_size_and_puts_marker_top_right() -> None:
    decoded = decode_image(exif_rotated_jpeg(size=(64, 32), marker=16))
    assert (decoded.width, decoded.height) == (32, 64)
    assert decoded.image.size == (32, 64)
    corners = {"top_left": (4, 4), "top_right": (27, 4), "bottom_left": (4, 59), "bottom_right": (27, 59)}
    reds = {name for name, xy in corners.items() if _close(decoded.image.getpixel(xy), RED)}
    blues = {name for name, xy in corners.items() if _close(decoded.image.getpixel(xy), BLUE)}
    assert reds == {"top_right"}
    assert blues == {"top_left", "bottom_left", "bottom_right"}


def test_cmyk_jpeg_saved_by_pillow_comes_back_red() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), RED).convert("CMYK").save(buffer, "JPEG", quality=95)
    decoded = decode_image(buffer.getvalue())
    assert _close(decoded.image.getpixel((16, 16)), RED)


def test_16bit_png_is_scaled_to_8_bits_not_clipped_to_white(corpus: dict[str, HostileFile]) -> None:
    pixels = np.asarray(load_image(corpus["png_16bit_gray"].path).image)
    assert pixels[0, :, 0].tolist() == list(range(256))  # column x held x*257


def test_transparent_pixels_take_the_requested_background() -> None:
    decoded = decode_image(palette_with_transparent_left(), background=(0, 0, 255))
    assert decoded.image.getpixel((4, 8)) == BLUE  # the transparent index is black underneath
    assert decoded.image.getpixel((28, 8)) == RED


def test_animated_gif_yields_its_first_frame(corpus: dict[str, HostileFile]) -> None:
    decoded = load_image(corpus["animated_gif"].path)
    assert np.all(np.asarray(decoded.image) == np.array(RED, dtype=np.uint8))


def test_20000x20000_png_header_is_refused_fast() -> None:
    data = png_claiming(20000, 20000)
    assert len(data) < 200
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"20000x20000.*max_pixels"):
        decode_image(data, source="huge.png")
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_ours_and_nothing_warns() -> None:
    # 210 Mpixels: over twice Pillow's own threshold, where Pillow would raise DecompressionBombError itself.
    data = jpeg_claiming(15000, 14000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge, match="max_pixels"):
            decode_image(data)
        allowed = decode_image(data, limits=DecodeLimits(max_pixels=300_000_000), draft_size=16)
    assert caught == []
    assert (allowed.width, allowed.height) == (15000, 14000)
    assert allowed.image.size == (1875, 1750)  # drafted at 1/8, so the test stays small


def test_byte_limit_refuses_bytes_and_files_that_decode_under_a_larger_limit(
    corpus: dict[str, HostileFile],
) -> None:
    path = corpus["png_over_byte_limit"].path
    with pytest.raises(ImageTooLarge, match="max_bytes"):
        read_image_file(path, CORPUS_LIMITS)
    data = read_image_file(path, DecodeLimits())
    assert data == path.read_bytes()
    with pytest.raises(ImageTooLarge, match="max_bytes"):
        decode_image(data, limits=CORPUS_LIMITS)
    assert decode_image(data).image.size == (620, 620)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("zero_bytes", "empty"),
        ("text_as_jpg", "text"),
        ("html_as_jpg", "HTML"),
        ("svg_as_png", "SVG"),
        ("pdf_as_jpg", "PDF"),
        ("heic_as_jpg", "heic"),
        ("directory_named_jpg", "directory"),
        ("fifo_named_jpg", "named pipe"),
    ],
)
def test_unsupported_files_are_refused_with_what_they_are(
    corpus: dict[str, HostileFile], name: str, words: str
) -> None:
    if name not in corpus:
        pytest.skip(f"{name} cannot be made on this platform")
    with pytest.raises(UnsupportedImage, match=words) as raised:
        load_image(corpus[name].path)
    assert str(corpus[name].path) in str(raised.value)


def test_errors_from_bytes_name_the_given_source_and_are_vlsearch_errors() -> None:
    with pytest.raises(CorruptImage) as raised:
        decode_image(b"\xff\xd8\xff" + bytes(100), source="upload:cat.jpg")
    assert raised.value.source == "upload:cat.jpg"
    assert isinstance(raised.value, VlsearchError)
    with pytest.raises(UnsupportedImage) as unnamed:
        decode_image(b"")
    assert unnamed.value.source == "<bytes>"


def test_truncated_jpeg_is_corrupt_and_loading_truncated_images_stays_off(
    corpus: dict[str, HostileFile],
) -> None:
    with pytest.raises(CorruptImage, match="truncated"):
        load_image(corpus["truncated_jpeg"].path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("draft_size", "decoded_size"),
    [(100, (500, 375)), (375, (500, 375)), (448, (1000, 750)), (751, (2000, 1500)), (3000, (4000, 3000))],
)
def test_jpeg_draft_decodes_smaller_keeps_original_size_and_short_side_at_least_draft(
    big_jpeg: bytes, draft_size: int, decoded_size: tuple[int, int]
) -> None:
    decoded = decode_image(big_jpeg, draft_size=draft_size)
    assert decoded.image.size == decoded_size
    assert min(decoded.image.size) >= draft_size
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.image.mode == "RGB"


def test_jpeg_draft_of_rotated_photo_reports_the_turned_original_size() -> None:
    decoded = decode_image(exif_rotated_jpeg(size=(4000, 3000), marker=1000), draft_size=448)
    assert (decoded.width, decoded.height) == (3000, 4000)
    assert decoded.image.size == (750, 1000)
    assert _close(decoded.image.getpixel((700, 50)), RED)  # marker still top-right after the draft


def test_draft_size_is_ignored_for_other_formats(corpus: dict[str, HostileFile]) -> None:
    decoded = load_image(corpus["png_16bit_gray"].path, draft_size=2)
    assert decoded.image.size == (256, 4)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "PNG"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8L", "WEBP"),
        (b"GIF87a\x01\x00\x01\x00", "GIF"),
        (b"BM\x46\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00", "BMP"),
        (b"MM\x00\x2a\x00\x00\x00\x08", "TIFF"),
        (b"II\x2b\x00\x08\x00\x00\x00", "TIFF"),
        (b"BMW 320i for sale", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"", None),
    ],
)
def test_sniff_format_goes_by_magic_bytes(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt


def test_decoding_in_threads_gives_the_same_pixels_as_serially(corpus: dict[str, HostileFile]) -> None:
    good = [f.path for f in corpus.values() if f.error is None]
    serial = [np.asarray(load_image(p).image).tobytes() for p in good]

    def decode_or_error(path: Path) -> bytes | str:
        try:
            return np.asarray(load_image(path, CORPUS_LIMITS).image).tobytes()
        except DecodeError as error:
            return type(error).__name__

    every = [f.path for f in corpus.values()] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode_or_error, every))
    by_path = dict(zip(every, results, strict=True))
    assert [by_path[p] for p in good] == serial
    assert all(isinstance(by_path[f.path], str) for f in corpus.values() if f.error is not None)


def test_decode_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        DecodeLimits(max_pixels=0)


def test_white_is_the_default_background(corpus: dict[str, HostileFile]) -> None:
    decoded = load_image(corpus["webp_alpha"].path)
    assert decoded.image.getpixel((2, 2)) == WHITE
