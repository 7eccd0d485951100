"""Loading by local directory or hub id: the class from config.json, preferences, identity, typed errors."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridProcessor,
    DeepseekVLProcessor,
    LlamaConfig,
)

import reranker.model
from indexer.errors import WeightsUnavailable
from reranker.errors import UnknownScoreMethod, UnsupportedModel
from reranker.model import VisionLanguageModel, get_model
from tests.reranker.tiny_models import save_tiny


@pytest.mark.parametrize(
    ("kind", "model_class", "processor_class"),
    [
        ("plain", DeepseekVLForConditionalGeneration, DeepseekVLProcessor),
        ("hybrid", DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor),
    ],
)
def test_local_directory_loads_the_class_its_config_names(
    tiny_dirs: dict[str, Path], kind: str, model_class: type[Any], processor_class: type[Any]
) -> None:
    vlm = VisionLanguageModel(str(tiny_dirs[kind]), device="cpu")
    vlm.load()
    model: Any = vlm.model
    assert type(model) is model_class
    assert type(vlm.processor) is processor_class
    assert model.dtype == torch.float32  # fp32 on CPU
    assert not model.training


def test_building_does_no_io_and_loading_is_idempotent(tiny_dirs: dict[str, Path]) -> None:
    VisionLanguageModel("/no/such/dir")  # nothing is read until load()
    vlm = VisionLanguageModel(str(tiny_dirs["plain"]))
    vlm.load()
    model = vlm.model
    vlm.load()
    assert vlm.model is model


def test_concurrent_first_uses_load_once(tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    original = reranker.model.load_vlm

    def counting(source: str, **kwargs: Any) -> Any:
        loads.append(source)
        return original(source, **kwargs)

    monkeypatch.setattr(reranker.model, "load_vlm", counting)
    vlm = VisionLanguageModel(str(tiny_dirs["plain"]))
    threads = [threading.Thread(target=vlm.load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [str(tiny_dirs["plain"])]


def test_get_model_returns_one_loaded_object_per_arguments(tiny_dirs: dict[str, Path]) -> None:
    first = get_model(str(tiny_dirs["hybrid"]), chunk_size=4)
    assert get_model(str(tiny_dirs["hybrid"]), chunk_size=4) is first
    assert get_model(str(tiny_dirs["hybrid"]), chunk_size=2) is not first
    assert isinstance(first.model, DeepseekVLHybridForConditionalGeneration)


def test_missing_local_directory_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(WeightsUnavailable, match="VLSEARCH_VLM_MODEL") as raised:
        VisionLanguageModel(str(missing)).load()
    assert str(missing) in str(raised.value)


def test_directory_without_config_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match=r"config\.json") as raised:
        VisionLanguageModel(str(tmp_path)).load()
    assert str(tmp_path) in str(raised.value)
    assert "VLSEARCH_VLM_MODEL" in str(raised.value)


def test_directory_without_weights_names_the_directory_and_setting(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    broken = shutil.copytree(tiny_dirs["plain"], tmp_path / "no-weights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(WeightsUnavailable, match="VLSEARCH_VLM_MODEL") as raised:
        VisionLanguageModel(str(broken)).load()
    assert str(broken) in str(raised.value)


def test_unknown_hub_id_while_offline_names_the_offline_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; set its copy too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE") as raised:
        VisionLanguageModel("vlsearch-tests/no-such-model").load()
    assert "vlsearch-tests/no-such-model" in str(raised.value)
    assert "VLSEARCH_VLM_MODEL" in str(raised.value)


def test_unknown_hub_id_with_local_files_only_is_weights_unavailable() -> None:
    with pytest.raises(WeightsUnavailable, match="local model directory"):
        VisionLanguageModel("vlsearch-tests/no-such-model", local_files_only=True).load()


def test_a_checkpoint_that_is_not_deepseek_vl_is_refused(tmp_path: Path) -> None:
    LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(UnsupportedModel, match="'llama'"):
        VisionLanguageModel(str(tmp_path)).load()


def test_preferred_score_method_comes_from_vlsearch_json(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "caption-model", hybrid=False, score_method="caption")
    assert json.loads((directory / "vlsearch.json").read_text()) == {"score_method": "caption"}
    vlm = VisionLanguageModel(str(directory))
    assert vlm.score_method == "caption"
    image = Image.new("RGB", (32, 32), "red")
    (default,) = vlm.score("a red circle", [image])
    assert default < 0  # a log-likelihood, not P(Yes)
    assert default == pytest.approx(vlm.score("a red circle", [image], method="caption")[0])
    assert VisionLanguageModel(str(directory), score_method="vqa").score_method == "vqa"


def test_without_vlsearch_json_the_method_is_vqa(tiny_dirs: dict[str, Path]) -> None:
    assert VisionLanguageModel(str(tiny_dirs["plain"])).score_method == "vqa"


def test_unknown_method_in_vlsearch_json_names_the_file(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dirs["plain"], tmp_path / "odd")
    (directory / "vlsearch.json").write_text('{"score_method": "itm"}')
    with pytest.raises(UnknownScoreMethod, match=r"vlsearch\.json"):
        VisionLanguageModel(str(directory)).load()


def test_tag_verification_preferences_come_from_vlsearch_json(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from reranker.tags import verify_tags

    directory = shutil.copytree(tiny_dirs["plain"], tmp_path / "tagging")
    preferences = {"score_method": "caption", "tag_prompt": "a {label}", "tag_threshold": -1.5}
    (directory / "vlsearch.json").write_text(json.dumps(preferences))
    vlm = VisionLanguageModel(str(directory))
    assert (vlm.tag_prompt, vlm.tag_threshold) == ("a {label}", -1.5)
    assert VisionLanguageModel(str(directory), score_method="vqa").tag_threshold is None  # not its own method
    image = Image.new("RGB", (32, 32), "red")
    scores = vlm.score_texts(image, ["a red", "a blue"])
    kept = verify_tags(vlm, image, ["red", "blue"])  # the checkpoint's prompt and cut, no argument needed
    assert kept == [tag for tag, score in zip(["red", "blue"], scores, strict=True) if score >= -1.5]
    assert VisionLanguageModel(str(tiny_dirs["plain"])).tag_prompt == "{label}"


def test_a_tag_prompt_without_the_label_names_the_file(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dirs["plain"], tmp_path / "odd-prompt")
    (directory / "vlsearch.json").write_text('{"tag_prompt": "a thing"}')
    with pytest.raises(UnsupportedModel, match=r"vlsearch\.json.*label"):
        VisionLanguageModel(str(directory)).load()


def test_unknown_method_argument_is_refused_at_construction() -> None:
    with pytest.raises(UnknownScoreMethod, match="score_method"):
        VisionLanguageModel("/anywhere", score_method="itm")


def test_identity_is_a_checksum_that_follows_the_weights(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    identity = VisionLanguageModel(str(tiny_dirs["plain"])).identity
    assert identity.startswith("sha256:")
    assert VisionLanguageModel(str(tiny_dirs["plain"]), chunk_size=1).identity == identity
    copy = shutil.copytree(tiny_dirs["plain"], tmp_path / "copy")
    assert VisionLanguageModel(str(copy)).identity == identity
    other = save_tiny(tmp_path / "other-seed", hybrid=False, seed=1)
    assert VisionLanguageModel(str(other)).identity != identity


def test_device_map_loads_the_same_model(tiny_dirs: dict[str, Path]) -> None:
    pytest.importorskip("accelerate", reason="device_map needs the accelerate package")
    image = [Image.new("RGB", (32, 32), "red")]
    mapped = VisionLanguageModel(str(tiny_dirs["hybrid"]), device_map="cpu")
    plain = VisionLanguageModel(str(tiny_dirs["hybrid"]))
    assert mapped.score("a red circle", image) == pytest.approx(plain.score("a red circle", image), abs=1e-6)
    assert mapped.loaded.input_device == torch.device("cpu")


def test_vqa_calibration_from_vlsearch_json_maps_the_log_odds_and_keeps_the_order(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green", "white")]
    raw = VisionLanguageModel(str(tiny_dirs["plain"])).score("a red circle", images, method="vqa")
    directory = shutil.copytree(tiny_dirs["plain"], tmp_path / "calibrated")
    (directory / "vlsearch.json").write_text('{"vqa_calibration": [2.0, -0.5]}')
    calibrated = VisionLanguageModel(str(directory)).score("a red circle", images, method="vqa")
    expected = [1 / (1 + math.exp(-(2.0 * math.log(p / (1 - p)) - 0.5))) for p in raw]
    assert calibrated == pytest.approx(expected, rel=1e-4)
    assert np.argsort(calibrated).tolist() == np.argsort(raw).tolist()


def test_a_malformed_vqa_calibration_names_the_file(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dirs["plain"], tmp_path / "odd-calibration")
    (directory / "vlsearch.json").write_text('{"vqa_calibration": [2.0]}')
    with pytest.raises(UnsupportedModel, match=r"vlsearch\.json.*vqa_calibration"):
        VisionLanguageModel(str(directory)).load()
