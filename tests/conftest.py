"""Shared fixtures: a tiny open_clip model saved as a real checkpoint file, settings on a temp dir, image folders."""

from __future__ import annotations

import os

# No test may reach a model hub: fail fast instead of retrying for a minute (set before huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from core.container import CONFIG_DIRS, Container
from core.settings import Settings

TINY_MODEL = "tiny-vit"


def save_random_checkpoint(path: Path, seed: int) -> Path:
    """A tiny open_clip model with seeded random weights, saved as a state-dict file like any real checkpoint."""
    for directory in CONFIG_DIRS:
        open_clip.add_model_config(directory)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-a.pt", seed=1)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-b.pt", seed=2)


@pytest.fixture
def settings(tmp_path: Path, tiny_checkpoint: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        clip_model=TINY_MODEL,
        clip_pretrained=str(tiny_checkpoint),
        device="cpu",
        text_templates=["{}"],
        decode_workers=2,
        batch_size=4,
    )


@pytest.fixture
def container(settings: Settings) -> Iterator[Container]:
    yield Container(settings)


def draw_scene(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A distinct picture per seed: a coloured background with a few filled shapes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        x1, y1 = x0 + int(rng.integers(10, size[0] // 2)), y0 + int(rng.integers(10, size[1] // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Eight distinct images in two subfolders, PNG and JPEG, of two sizes."""
    root = tmp_path / "photos"
    for index in range(8):
        folder = root / ("trip" if index < 4 else "home")
        folder.mkdir(parents=True, exist_ok=True)
        size = (96, 80) if index % 2 == 0 else (160, 120)
        suffix = "png" if index % 3 else "jpg"
        draw_scene(index, size).save(folder / f"img{index}.{suffix}")
    return root
