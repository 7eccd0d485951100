"""The shipped shapes-world DeepSeek-VL loads through the production loader, captions scenes and reranks CLIP.

The training log (models/shapes-vlm/training_log.txt) reports the figures on 400 test scenes and 200 relation
queries; CI checks smaller seeded sets against floors a stated margin under those figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import DeepseekVLForConditionalGeneration

from core.container import Container
from core.settings import Settings
from models import MODELS_DIR
from models.shapes_world import Scene, generate_scenes, render, true_captions
from models.train_vlm import (
    Prompts,
    build_model,
    build_processor,
    caption_accuracy,
    hard_negative_accuracy,
    load_clip,
    make_batch,
    patch_labels,
    relation_queries_with_a_match,
    rerank_recall,
    training_step,
)
from reranker.images import prepare
from reranker.model import VisionLanguageModel
from reranker.scoring import SCORE_METHODS
from retriever.store import Hit

CHECKPOINT = MODELS_DIR / "shapes-vlm"
# Targets of the issue, and the margin CI allows under them on its small sets (40 scenes: one scene is 0.025).
CAPTION_TARGET, CAPTION_MARGIN = 0.85, 0.10
HARD_NEGATIVE_FLOOR = 0.80  # the default method's true caption beats all its hard negatives (log: see docstring)
RERANK_GAIN_FLOOR = 0.20  # relation R@1 of CLIP + rerank minus CLIP alone, on 150 scenes and 20 queries
RERANK_R1_FLOOR = 0.70


@pytest.fixture(scope="module")
def vlm() -> VisionLanguageModel:
    """The shipped model by its name, as the service builds it from settings."""
    return Container(Settings(vlm_model="shapes-vlm", vlm_device="cpu")).vlm()


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes("test", 40, seed=2024)


def test_checkpoint_is_a_saved_model_directory_with_a_preferred_method() -> None:
    assert (CHECKPOINT / "config.json").is_file()
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    preferences = json.loads((CHECKPOINT / "vlsearch.json").read_text())
    assert preferences["score_method"] in SCORE_METHODS


def test_loads_by_path_as_the_plain_deepseek_vl_class_in_fp32() -> None:
    model = VisionLanguageModel(str(CHECKPOINT), device="cpu")
    model.load()
    assert type(model.model) is DeepseekVLForConditionalGeneration
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    tokenizer = model.processor.tokenizer
    assert model.processor.image_token == "<image_placeholder>"
    assert tokenizer.convert_tokens_to_ids("<image_placeholder>") == model.processor.image_token_id
    yes, no = model.vqa_token_ids
    assert len(yes) == 1 and len(no) == 1


def test_shipped_name_resolves_to_the_checkpoint_and_its_preferred_method(vlm: VisionLanguageModel) -> None:
    assert vlm.source == str(CHECKPOINT)
    preferences = json.loads((CHECKPOINT / "vlsearch.json").read_text())
    assert vlm.score_method == preferences["score_method"]


@pytest.mark.slow
@pytest.mark.parametrize("side", [64, 256])
def test_captions_name_every_object_and_a_true_relation(
    vlm: VisionLanguageModel, scenes: list[Scene], side: int
) -> None:
    assert caption_accuracy(vlm, scenes, side) >= CAPTION_TARGET - CAPTION_MARGIN


@pytest.mark.slow
def test_default_method_prefers_the_true_caption_over_its_hard_negatives(
    vlm: VisionLanguageModel, scenes: list[Scene]
) -> None:
    accuracy = hard_negative_accuracy(vlm, scenes, 128, vlm.score_method, np.random.default_rng(0))
    assert accuracy >= HARD_NEGATIVE_FLOOR


@pytest.mark.slow
def test_reranking_clip_top_20_raises_relation_r_at_1(vlm: VisionLanguageModel) -> None:
    collection = generate_scenes("test", 150, seed=2025)
    query_texts = relation_queries_with_a_match(collection, 20, np.random.default_rng(0))
    clip: Any = load_clip()
    figures = rerank_recall(vlm, clip, collection, query_texts, side=96, methods=[vlm.score_method])
    reranked = figures[f"rerank {vlm.score_method} R@1"]
    assert reranked >= RERANK_R1_FLOOR
    assert reranked - figures["clip R@1"] >= RERANK_GAIN_FLOOR


@pytest.mark.slow
def test_the_model_answers_the_vqa_question_about_a_scene(vlm: VisionLanguageModel, scenes: list[Scene]) -> None:
    scene = next(s for s in scenes if len(s.objects) == 1)
    obj = scene.objects[0]
    answer = vlm.ask(render(scene, 64), f'Does this figure show "a {obj.colour} {obj.shape}"? Please answer yes or no.')
    assert answer in ("Yes", "No")


def test_training_rows_are_the_prompts_and_scores_of_the_production_code() -> None:
    processor = build_processor()
    model = build_model(processor, seed=1)
    prompts = Prompts(processor)
    vlm = VisionLanguageModel.from_components(model, processor, device="cpu")
    scene = generate_scenes("test", 1, seed=3)[0]
    image = render(scene, 100)
    pixels = processor.image_processor([prepare(image, 64)], return_tensors="pt")["pixel_values"]
    query = "a red circle left of a small blue square"
    assert prompts.vqa(query)[0] == vlm._rows([query], "vqa")[0][0]
    row, start = prompts.caption(query)
    # Loss on the caption's words (not the EOS after them) is minus the caption score times their number.
    batch = make_batch([(row, [(p, 1.0) for p in range(start - 1, len(row) - 2)], 0)],
                       processor.tokenizer.pad_token_id, processor.image_token_id)
    with torch.no_grad():
        loss = training_step(model.eval(), pixels, batch)
    score = vlm.score(query, [image], method="caption")[0]
    assert loss.item() == pytest.approx(-score * (len(row) - 1 - start), rel=1e-4)


def test_patch_labels_name_the_covering_object_and_its_relations() -> None:
    scene = next(s for s in generate_scenes("train", 20, seed=5) if len(s.objects) == 2)
    labels = patch_labels(scene)
    assert labels.shape == (7, 64)
    on_objects = labels[0] < 6
    assert on_objects.any() and not on_objects.all()
    assert (labels[3:, ~on_objects] == 0).all(), "background patches stand in no relation"
    assert labels[3:, on_objects].any(), "two objects always stand in some relation"


def test_photos_decoded_at_the_models_size_score_and_caption_as_decoded_in_full(
    vlm: VisionLanguageModel, scenes: list[Scene], tmp_path: Path
) -> None:
    """Search decodes candidates for the generative model with JPEG draft (1/2 to 1/8 in the decoder), to both
    sides at least `decode_side`: a fraction of a full decode of a photo, for the same captions and ranking."""
    container = Container(Settings(data_dir=tmp_path / "data", vlm_model="shapes-vlm", vlm_device="cpu"))
    hits = []
    for index, scene in enumerate(scenes[:12]):
        path = tmp_path / f"{index}.jpg"
        render(scene, 1024).save(path, quality=92)
        hits.append(Hit(id=str(index), score=0.0, payload={"paths": [str(path)]}))
    full = [container.load_hit_image(hit) for hit in hits]
    drafted = [container.hit_image_loader(vlm)(hit) for hit in hits]
    assert all(image.size == (1024, 1024) for image in full)
    assert all(vlm.decode_side <= min(image.size) and max(image.size) <= 512 for image in drafted)
    assert vlm.caption(drafted) == vlm.caption(full)
    query = next(caption for scene in scenes[:12] for caption in true_captions(scene, ("relation",)))
    full_scores, drafted_scores = vlm.score(query, full), vlm.score(query, drafted)
    assert np.argsort(drafted_scores).tolist() == np.argsort(full_scores).tolist()
    assert max(abs(a - b) for a, b in zip(full_scores, drafted_scores, strict=True)) < 0.05
