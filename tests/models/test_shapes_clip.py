"""The shipped shapes-world CLIP loads through open_clip's `local-dir:` path and finds objects it was asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from models import MODELS_DIR
from models.shapes_world import Scene, generate_scenes, queries, relevance_matrix, render
from models.train_clip import embed_images, embed_texts, hard_negative_accuracy, planned_steps, recall_at_k

CHECKPOINT = MODELS_DIR / "shapes-clip"
# The training log reports R@10 >= 0.95 for object queries on 2000 test scenes; CI checks a smaller set
# with this margin below that target.
OBJECT_R_AT_10_FLOOR = 0.90
HARD_NEGATIVE_FLOOR = 0.6


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Callable[..., torch.Tensor], Any]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{CHECKPOINT}")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{CHECKPOINT}")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes("test", 300, seed=2024)


def test_checkpoint_is_in_local_dir_layout_and_small() -> None:
    assert (CHECKPOINT / "open_clip_config.json").is_file()
    weights = CHECKPOINT / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024


def test_loaded_model_preprocesses_to_its_64_px_input(shipped: tuple[Any, Any, Any], scenes: list[Scene]) -> None:
    model, preprocess, tokenizer = shipped
    assert preprocess(render(scenes[0], 256)).shape == (3, 64, 64)
    assert preprocess(render(scenes[0], 64)).shape == (3, 64, 64)
    assert tokenizer(["a red circle"]).shape[0] == 1
    assert all(p.dtype == torch.float32 for p in model.parameters()), "fp16 weights are cast on load"


@pytest.mark.parametrize("side", [64, 256])
def test_object_queries_find_a_matching_scene_in_the_top_10(
        shipped: tuple[Any, Any, Any], scenes: list[Scene], side: int) -> None:
    model, preprocess, tokenizer = shipped
    object_queries = queries("object")
    relevant = relevance_matrix(object_queries, scenes)
    assert relevant.any(axis=1).all(), "every object query has a relevant scene in the set"
    scores = embed_texts(model, tokenizer, object_queries) @ embed_images(
        model, preprocess, [render(s, side) for s in scenes]).T
    assert recall_at_k(scores, relevant)[10] >= OBJECT_R_AT_10_FLOOR


def test_single_objects_are_named_by_their_colour_and_mostly_their_shape(
        shipped: tuple[Any, Any, Any], scenes: list[Scene]) -> None:
    model, preprocess, tokenizer = shipped
    singles = [s for s in scenes if len(s.objects) == 1]
    object_queries = queries("object")
    scores = embed_images(model, preprocess, [render(s, 128) for s in singles]) @ embed_texts(
        model, tokenizer, object_queries).T
    named = [object_queries[i].split() for i in scores.argmax(axis=1)]
    colours = [words[1] == s.objects[0].colour for words, s in zip(named, singles, strict=True)]
    both = [words[1:] == [s.objects[0].colour, s.objects[0].shape] for words, s in zip(named, singles, strict=True)]
    # Measured on these scenes: colour 1.00, colour and shape 0.80 (the tiny ViT learns shapes last).
    assert float(np.mean(colours)) >= 0.95
    assert float(np.mean(both)) >= 0.7


def test_true_relation_captions_outscore_their_hard_negatives_more_often_than_not(
        shipped: tuple[Any, Any, Any], scenes: list[Scene]) -> None:
    model, preprocess, tokenizer = shipped
    accuracy, pairs = hard_negative_accuracy(model, preprocess, tokenizer, scenes, 64)
    assert pairs > 500
    # Chance is 0.5, measured 0.68: CLIP binds words to objects loosely, which the generative reranker is for.
    assert accuracy >= HARD_NEGATIVE_FLOOR


def test_recall_at_k_counts_queries_with_a_relevant_scene_in_their_top_k() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.5, 0.4, 0.3]])
    relevant = np.array([[True, False, False], [False, False, True], [False, False, False]])
    # The third query has no relevant scene and is left out; the second finds its scene only at rank 3.
    assert recall_at_k(scores, relevant, ks=(1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 1.0}


def test_training_keeps_its_planned_steps_unless_the_pace_would_overrun_the_budget() -> None:
    assert planned_steps(done=100, elapsed_s=100.0, planned=800, budget_s=1000.0) == 800
    assert planned_steps(done=100, elapsed_s=200.0, planned=800, budget_s=1000.0) == 500
    assert planned_steps(done=10, elapsed_s=100.0, planned=800, budget_s=60.0) == 800  # too early to judge
    assert planned_steps(done=100, elapsed_s=2000.0, planned=800, budget_s=1000.0) == 101
