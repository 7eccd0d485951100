"""Tag verification: keep the tags whose score reaches their threshold, with the model's own scores."""

from __future__ import annotations

import pytest
from PIL import Image

from reranker.model import VisionLanguageModel
from reranker.tags import verify_tags

TAGS = ["red", "blue square", "a small green triangle", "circle", "purple diamond"]


def test_tags_at_or_over_the_threshold_are_kept_in_input_order(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    scores = dict(zip(TAGS, vlm.score_texts(images[2], TAGS), strict=True))
    threshold = sorted(scores.values())[2]  # the middle score: two tags fall under it
    kept = verify_tags(vlm, images[2], TAGS, threshold=threshold)
    assert kept == [tag for tag in TAGS if scores[tag] >= threshold]
    assert len(kept) == 3


def test_default_threshold_is_one_half_under_vqa(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    scores = vlm.score_texts(images[0], TAGS, method="vqa")
    kept = verify_tags(vlm, images[0], TAGS)
    assert kept == [tag for tag, score in zip(TAGS, scores, strict=True) if score >= 0.5]


def test_per_tag_thresholds_apply_to_their_tag_only(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    assert verify_tags(vlm, images[1], TAGS, threshold={tag: 0.0 for tag in TAGS}) == TAGS
    assert verify_tags(vlm, images[1], TAGS, threshold={tag: 1.01 for tag in TAGS}) == []
    only_red = {tag: 1.01 for tag in TAGS} | {"red": 0.0}
    assert verify_tags(vlm, images[1], TAGS, threshold=only_red) == ["red"]


def test_repeated_tags_are_kept_once(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    assert verify_tags(vlm, images[0], ["red", "red", "circle"], threshold=0.0) == ["red", "circle"]
    assert verify_tags(vlm, images[0], []) == []


def test_caption_method_needs_explicit_thresholds(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    with pytest.raises(ValueError, match="threshold"):
        verify_tags(vlm, images[0], TAGS, method="caption")
    scores = vlm.score_texts(images[0], TAGS, method="caption")
    kept = verify_tags(vlm, images[0], TAGS, threshold=max(scores), method="caption")
    assert kept == [TAGS[scores.index(max(scores))]]
