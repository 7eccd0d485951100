"""The open_clip encoder: loading by name, checkpoint file and local-dir; outputs; clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from core.container import CONFIG_DIRS
from indexer.encoder import ClipEncoder, EncoderSpec, UnknownModel
from indexer.errors import WeightsUnavailable
from tests.conftest import TINY_MODEL, draw_scene


def make_encoder(name: str = TINY_MODEL, pretrained: str | None = None, **kwargs) -> ClipEncoder:
    return ClipEncoder(EncoderSpec(name, pretrained), device="cpu", config_dirs=CONFIG_DIRS, **kwargs)


def test_checkpoint_file_loads_and_identity_is_its_sha256(tiny_checkpoint: Path) -> None:
    import hashlib

    encoder = make_encoder(pretrained=str(tiny_checkpoint))
    assert encoder.identity == "sha256:" + hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert encoder.dim == 64 and encoder.image_size == 64
    reference = open_clip.create_model(TINY_MODEL, pretrained=str(tiny_checkpoint))
    reference_state = reference.state_dict()
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_outputs_are_l2_normalised_float32(tiny_checkpoint: Path) -> None:
    encoder = make_encoder(pretrained=str(tiny_checkpoint))
    texts = encoder.encode_texts(["a red circle", "a blue square left of a green triangle"])
    images = encoder.encode_pil([draw_scene(1), draw_scene(2, (300, 40))])
    for vectors in (texts, images):
        assert vectors.dtype == np.float32 and vectors.shape == (2, 64)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_short_queries_average_the_prompt_templates(tiny_checkpoint: Path) -> None:
    templates = ["a photo of {}.", "{} in a picture"]
    encoder = make_encoder(pretrained=str(tiny_checkpoint), templates=templates, template_max_words=3)
    plain = make_encoder(pretrained=str(tiny_checkpoint))
    short = "red circle"
    each = plain.encode_texts([t.format(short) for t in templates], use_templates=False)
    expected = each.mean(axis=0) / np.linalg.norm(each.mean(axis=0))
    np.testing.assert_allclose(encoder.encode_texts([short])[0], expected, atol=1e-5)
    long = "a large red circle above a small blue square"  # over template_max_words: used as is
    np.testing.assert_allclose(encoder.encode_texts([long]), plain.encode_texts([long]), atol=1e-6)


def test_untrained_model_is_the_same_in_every_process() -> None:
    first, second = make_encoder(), make_encoder()
    assert first.identity == "untrained"
    np.testing.assert_array_equal(first.encode_texts(["x"]), second.encode_texts(["x"]))


def test_local_dir_layout_loads_like_a_hub_repo(tmp_path: Path, tiny_checkpoint: Path) -> None:
    directory = tmp_path / "my-model"
    directory.mkdir()
    model_cfg = open_clip.get_model_config(TINY_MODEL)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    state = torch.load(tiny_checkpoint, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "open_clip_model.safetensors")
    encoder = make_encoder(f"local-dir:{directory}")
    reference = make_encoder(pretrained=str(tiny_checkpoint))
    assert encoder.identity.startswith("sha256:")
    np.testing.assert_allclose(
        encoder.encode_texts(["a red circle"]), reference.encode_texts(["a red circle"]), atol=1e-6
    )


def test_missing_checkpoint_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="VLSEARCH_CLIP_PRETRAINED"):
        make_encoder(pretrained=str(tmp_path / "missing.pt")).load()


def test_unknown_model_names_the_setting() -> None:
    with pytest.raises(UnknownModel, match="VLSEARCH_CLIP_MODEL"):
        make_encoder("no-such-model").load()


def test_offline_hub_gives_one_clear_error_quickly() -> None:
    # HF_HUB_OFFLINE=1 (tests/conftest.py) stands in for a machine without hub access: the network is the boundary.
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="VLSEARCH_CLIP_PRETRAINED"):
        make_encoder("ViT-B-32", "laion2b_s34b_b79k").load()
    assert time.perf_counter() - started < 30
