"""Where images come from: a folder (recursive), a list of paths (yielded in a deterministic order), or bytes
(an upload, a fetched image) with the name they came under."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import InvalidQuery

# Files with other extensions in a folder are not images the user meant to index, so they are skipped
# silently; a file WITH one of these extensions that is not an image is reported as a failure.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
OUTSIDE_ROOT = "a symbolic link leading outside the source folder: not followed"


@dataclass(frozen=True)
class RefusedFile:
    """A file a folder holds that is not read, with why: the pipeline reports it as a per-file failure."""

    path: Path
    reason: str


def iter_folder(root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Iterator[Path | RefusedFile]:
    """Image files under root, recursively, sorted; symlinked folders are not followed (no loops), and a symlinked
    file whose target lies outside root is refused (a link planted in a shared folder must not read other files)."""
    real_root = os.path.realpath(root)
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in extensions:
                path = Path(directory) / name
                yield RefusedFile(path, OUTSIDE_ROOT) if _leads_outside(path, real_root) else path


def _leads_outside(path: Path, real_root: str) -> bool:
    if not path.is_symlink():
        return False
    target = os.path.realpath(path)  # a loop or a dangling link still resolves, to where it points
    return os.path.commonpath((real_root, target)) != real_root


def iter_sources(paths: Iterable[Path]) -> Iterator[Path | RefusedFile]:
    """Each path as given, folders expanded recursively; paths are made absolute so ids of paths are stable."""
    for path in paths:
        path = Path(os.path.abspath(path))
        if path.is_dir():
            yield from iter_folder(path)
        else:
            yield path


def path_text(path: Path | str) -> str:
    """path as text that can be stored and printed: a name that is not valid UTF-8 (its bytes kept by Python as
    surrogates) shows its bytes as \\xNN escapes."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def read_listing(path: Path) -> list[str]:
    """The entries of a listing file (`--paths FILE`, `--urls FILE`): one per line, blank lines and lines starting
    with # skipped, surrounding spaces dropped, each entry once in first-seen order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidQuery(f"cannot read the listing {path}: {error}") from None
    entries = (line.strip() for line in text.splitlines())
    return list(dict.fromkeys(entry for entry in entries if entry and not entry.startswith("#")))


def read_path_list(path: Path) -> list[Path]:
    """The files a `--paths` listing names; relative ones are relative to the listing's own folder."""
    return [Path(os.path.abspath(path.parent / entry)) for entry in read_listing(path)]


@dataclass(frozen=True)
class ImageBytes:
    """An image given as bytes rather than a file: `name` is the name it came under (an upload's file name, a URL),
    recorded as the payload's `source_name`; the pipeline keeps the bytes content-addressed (payload `blob`)."""

    name: str
    data: bytes

    def __repr__(self) -> str:  # not the bytes
        return f"ImageBytes(name={self.name!r}, {len(self.data)} bytes)"


ImageSource = Path | ImageBytes | RefusedFile
