"""Where images come from: a folder (recursive) or a list of paths, yielded in a deterministic order."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

# Files with other extensions in a folder are not images the user meant to index, so they are skipped
# silently; a file WITH one of these extensions that is not an image is reported as a failure.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def iter_folder(root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Iterator[Path]:
    """Image files under root, recursively, sorted; symlinked folders are not followed (no loops)."""
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in extensions:
                yield Path(directory) / name


def iter_sources(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path as given, folders expanded recursively; paths are made absolute so ids of paths are stable."""
    for path in paths:
        path = Path(os.path.abspath(path))
        if path.is_dir():
            yield from iter_folder(path)
        else:
            yield path
