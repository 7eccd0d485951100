"""Tiny random DeepSeek-VL checkpoints (plain and hybrid), saved once per session, and images to score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reranker.model import VisionLanguageModel
from tests.reranker.tiny_models import KINDS, save_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vlm")
    return {kind: save_tiny(root / kind, hybrid=kind == "hybrid") for kind in KINDS}


@pytest.fixture(scope="session", params=KINDS)
def vlm(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> VisionLanguageModel:
    """A tiny model loaded by the production loader, once per class; tests must undo changes to it."""
    model = VisionLanguageModel(str(tiny_dirs[request.param]), device="cpu", chunk_size=8, max_new_tokens=8)
    model.load()
    return model


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Seven distinct noise images of different sizes (the model's input is 32 px)."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 24), (17, 60), (64, 64), (32, 32), (5, 9), (48, 30)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
