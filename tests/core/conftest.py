"""Service fixtures: the shipped shapes-world models on a small generated collection."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.container import SHIPPED_CLIP_MODELS, SHIPPED_VLM_MODELS
from core.service import Service
from core.settings import Settings
from models.shapes_world import generate_scenes, write_collection

if (
    not (SHIPPED_CLIP_MODELS["shapes-clip"] / "open_clip_config.json").exists()
    or not (SHIPPED_VLM_MODELS["shapes-vlm"] / "config.json").exists()
):
    pytest.skip("the shipped shapes-world models are not built yet", allow_module_level=True)


@pytest.fixture(scope="session")
def scenes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve shapes-world test scenes as PNG files (64 px), with scenes.jsonl."""
    folder = tmp_path_factory.mktemp("scenes") / "s"
    write_collection(generate_scenes("test", 12, seed=11), folder, size=64)
    return folder


@pytest.fixture
def shapes_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        collection="shapes",
        clip_model="shapes-clip",
        clip_pretrained=None,
        device="cpu",
        text_templates=["{}"],
        vlm_model="shapes-vlm",
        vlm_device="cpu",
        vlm_max_new_tokens=12,
        decode_workers=2,
        image_workers=2,
        batch_size=8,
    )


@pytest.fixture
def service(shapes_settings: Settings) -> Iterator[Service]:
    with Service(shapes_settings) as service:
        yield service


@pytest.fixture
def indexed(service: Service, scenes_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the scenes (tests change files), indexed into the service's collection."""
    folder = tmp_path / "scenes"
    shutil.copytree(scenes_folder, folder)
    result = service.index([folder])
    assert (result.report.added, result.report.failed) == (12, [])
    return folder
