"""Tiny random DeepSeek-VL checkpoints for the reranker tests, saved like released ones."""

from __future__ import annotations

from pathlib import Path

from reranker.tiny import build_tiny_model, build_tiny_processor, save_tiny_model

WORDS = [
    "circle square triangle diamond red green blue yellow purple orange small large",
    "left right of above below a",
]
# 0.1 rather than the default 0.02: random scores then differ enough between images to show their order.
INIT_RANGE = 0.1
KINDS = ("plain", "hybrid")


def save_tiny(directory: Path, hybrid: bool, seed: int = 0, score_method: str | None = None) -> Path:
    """Build a tiny random model of one class with its processor and save it like a released checkpoint."""
    processor = build_tiny_processor(WORDS, image_size=32, hybrid=hybrid)
    model = build_tiny_model(processor, seed=seed, initializer_range=INIT_RANGE)
    return save_tiny_model(directory, model, processor, score_method=score_method)
