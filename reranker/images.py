"""Images as the DeepSeek-VL processors expect them: RGB, transparency on white, not needlessly large."""

from __future__ import annotations

import os
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


# PIL converts and resizes without the GIL, so a chunk of candidates is prepared on every core at once.
def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vlsearch-prepare")


_POOL = _new_pool()


def _renew_pool_in_child() -> None:
    """A forked child (a prefork Celery worker) has none of the parent's threads: give it a pool of its own."""
    global _POOL
    _POOL = _new_pool()


os.register_at_fork(after_in_child=_renew_pool_in_child)


def prepare_all(images: Sequence[Image.Image], side: int) -> list[Image.Image]:
    """`prepare` of each image, in input order; several at once when there are several."""
    if len(images) < 2:
        return [prepare(image, side) for image in images]
    return list(_POOL.map(prepare, images, [side] * len(images)))
