"""Images as the DeepSeek-VL processors expect them: RGB, transparency on white, not needlessly large."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

# Shrink to no less than this many times the model's input side before the processor's own resize:
# converting and resizing a full photo as a float tensor costs more than the small model it feeds.
_HEADROOM = 2


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image` (L, P, RGBA, CMYK …); transparent pixels become white rather than black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def input_side(image_processor: Any) -> int:
    """The largest side the image processor resizes to (the high-res tower's, for the hybrid model)."""
    sizes = [image_processor.size, getattr(image_processor, "high_res_size", None)]
    return max(int(max(size["height"], size["width"])) for size in sizes if size)


def decode_side(image_processor: Any) -> int:
    """The smallest side worth decoding a candidate at: `prepare` shrinks anything larger to about this, so a
    JPEG decoded straight to it (draft mode, scaled by 1/2 to 1/8 in the decoder) loses nothing the model sees
    and costs a fraction of a full decode."""
    return _HEADROOM * input_side(image_processor)


def prepare(image: Image.Image, side: int) -> Image.Image:
    """RGB, shrunk by the largest whole factor that keeps its longer side at least `_HEADROOM` × `side`.

    A box average over factor × factor blocks: one pass over the pixels, the cheapest antialiasing there is.
    What is left, under 4:1, is the processor's own antialiased resize to `side`.
    """
    image = to_rgb(image)
    factor = max(image.size) // (_HEADROOM * side)
    return image.reduce(factor) if factor >= 2 else image


def default_workers() -> int:
    """Threads that prepare candidates when the caller names none: a few, not every core in every process."""
    return max(1, min(4, os.cpu_count() or 1))


# PIL converts and resizes without the GIL, so a chunk of candidates is prepared on several threads at once.
# Pools by size, made on first use; each process (an API server, each worker) has its own.
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlsearch-prepare")
            _POOLS[workers] = pool
        return pool


def _renew_pools_in_child() -> None:
    """A forked child (a prefork Celery worker) has none of the parent's threads: it makes pools of its own."""
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()


os.register_at_fork(after_in_child=_renew_pools_in_child)


def prepare_all(images: Sequence[Image.Image], side: int, workers: int | None = None) -> list[Image.Image]:
    """`prepare` of each image, in input order; on up to `workers` threads (default: `default_workers()`)."""
    workers = workers or default_workers()
    if workers < 2 or len(images) < 2:
        return [prepare(image, side) for image in images]
    return list(_pool(workers).map(prepare, images, [side] * len(images)))
