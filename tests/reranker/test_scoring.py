"""Relevance scores: batched equals one by one, images encoded once, both equal a plain forward pass."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from reranker.errors import EmptyQuery, PromptTooLong, UnknownScoreMethod
from reranker.images import input_side, prepare
from reranker.model import VisionLanguageModel
from reranker.scoring import shared_prefix_length

QUERY = "a red circle left of a blue square"


def conversation(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def plain_forward_logits(vlm: VisionLanguageModel, text: str, image: Image.Image) -> tuple[torch.Tensor, Any]:
    """Logits of one full forward pass; the processor expands the image tokens in `text`."""
    processor = vlm.processor
    inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits[0].float()
    return logits, inputs


def hand_vqa_score(vlm: VisionLanguageModel, query: str, image: Image.Image) -> float:
    question = f'Does this figure show "{query}"? Please answer yes or no.'
    prompt = vlm.processor.apply_chat_template(
        conversation(question), add_generation_prompt=True, tokenize=False
    )
    logits, _ = plain_forward_logits(vlm, prompt, image)
    probabilities = torch.softmax(logits[-1], dim=-1)
    tokenizer = vlm.processor.tokenizer
    yes = probabilities[tokenizer.convert_tokens_to_ids("Yes")]
    no = probabilities[tokenizer.convert_tokens_to_ids("No")]
    return float(yes / (yes + no))


def hand_caption_score(vlm: VisionLanguageModel, query: str, image: Image.Image) -> float:
    prompt = vlm.processor.apply_chat_template(
        conversation("Describe the image in one short sentence."), add_generation_prompt=True, tokenize=False
    )
    logits, inputs = plain_forward_logits(vlm, prompt + " " + query, image)
    answer = vlm.processor.tokenizer(" " + query, add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0, -len(answer) :].tolist() == answer
    log_probs = torch.log_softmax(logits[-len(answer) - 1 : -1], dim=-1)
    return float(sum(log_probs[position, token] for position, token in enumerate(answer)) / len(answer))


@pytest.mark.parametrize("method", ["vqa", "caption"])
def test_batched_scores_equal_one_by_one_in_input_order(
    vlm: VisionLanguageModel, images: list[Image.Image], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singles = [vlm.score(QUERY, [image], method=method)[0] for image in images]
    assert max(singles) - min(singles) > 1e-3  # distinct scores, so a wrong order could not pass
    for chunk_size in (1, 3, len(images)):
        monkeypatch.setattr(vlm, "chunk_size", chunk_size)
        assert vlm.score(QUERY, images, method=method) == pytest.approx(singles, abs=1e-5)


@pytest.mark.parametrize("method", ["vqa", "caption"])
def test_candidates_share_one_run_of_the_prompt_before_the_image(
    vlm: VisionLanguageModel, images: list[Image.Image], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched, the system prompt runs once for the chunk (batch 1), then each row continues from its cache."""
    language_model = vlm.model.model.language_model
    batch_sizes: list[tuple[int, int]] = []
    original = language_model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        shape = (embeds if embeds is not None else ids).shape
        batch_sizes.append((int(shape[0]), int(shape[1])))
        return original(*args, **kwargs)

    monkeypatch.setattr(language_model, "forward", counting)
    monkeypatch.setattr(vlm, "chunk_size", len(images))
    vlm.score(QUERY, images, method=method)
    prefix = vlm._rows([QUERY], method)[0][0].index(vlm.processor.image_token_id)
    assert batch_sizes[0] == (1, prefix)
    assert [rows for rows, _ in batch_sizes[1:]] == [len(images)]
    assert batch_sizes[1][1] == len(vlm._rows([QUERY], method)[0][0]) - prefix


def test_shared_prefix_only_for_unpadded_rows_that_agree_before_the_image() -> None:
    image = 9
    assert shared_prefix_length([[1, 2, image, 5], [1, 2, image, 6]], image) == 2
    assert shared_prefix_length([[1, 2, image, 5]], image) == 0, "one row: nothing to share"
    assert shared_prefix_length([[1, 2, image, 5], [1, 2, image]], image) == 0, "padded rows"
    assert shared_prefix_length([[1, 2, image], [1, 3, image]], image) == 0, "different prompts"
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], image) == 0, "no image"


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_each_image_is_encoded_once(
    vlm: VisionLanguageModel, images: list[Image.Image], chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[int] = []
    original = vlm.model.model.get_image_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        encoded.append(output.pooler_output.shape[0])
        return output

    monkeypatch.setattr(vlm.model.model, "get_image_features", counting)
    monkeypatch.setattr(vlm, "chunk_size", chunk_size)
    for method in ("vqa", "caption"):
        encoded.clear()
        vlm.score(QUERY, images, method=method)
        assert sum(encoded) == len(images)
        assert len(encoded) == math.ceil(len(images) / chunk_size)


def test_texts_scored_against_one_image_encode_it_once(
    vlm: VisionLanguageModel, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[int] = []
    original = vlm.model.model.get_image_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        encoded.append(output.pooler_output.shape[0])
        return output

    monkeypatch.setattr(vlm.model.model, "get_image_features", counting)
    monkeypatch.setattr(vlm, "chunk_size", 2)
    vlm.score_texts(images[0], ["red", "a blue square", "green circle", "a small yellow triangle", "left"])
    assert encoded == [1]


@pytest.mark.parametrize("method", ["vqa", "caption"])
def test_texts_of_different_lengths_score_as_they_do_alone(
    vlm: VisionLanguageModel, images: list[Image.Image], method: str
) -> None:
    texts = ["red", "a large purple diamond above a small orange circle", "square", "blue circle"]
    alone = [vlm.score_texts(images[1], [text], method=method)[0] for text in texts]
    assert vlm.score_texts(images[1], texts, method=method) == pytest.approx(alone, abs=1e-5)
    assert vlm.score_texts(images[1], texts, method=method)[0] == pytest.approx(
        vlm.score(texts[0], [images[1]], method=method)[0], abs=1e-6
    )


def test_vqa_score_is_p_yes_of_a_plain_forward_pass(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    scores = vlm.score(QUERY, images[:3], method="vqa")
    expected = [hand_vqa_score(vlm, QUERY, image) for image in images[:3]]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0.0 <= score <= 1.0 for score in scores)


def test_vqa_reads_the_single_token_yes_and_no(vlm: VisionLanguageModel) -> None:
    tokenizer = vlm.processor.tokenizer
    yes, no = vlm.vqa_token_ids
    assert yes == [tokenizer.convert_tokens_to_ids("Yes")]
    assert no == [tokenizer.convert_tokens_to_ids("No")]


def test_caption_score_is_mean_log_likelihood_of_the_query(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    scores = vlm.score(QUERY, images[:3], method="caption")
    expected = [hand_caption_score(vlm, QUERY, image) for image in images[:3]]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(score < 0 for score in scores)


def test_no_candidates_give_no_scores(vlm: VisionLanguageModel) -> None:
    assert vlm.score(QUERY, []) == []
    assert vlm.score(QUERY, [], method="caption") == []
    assert vlm.score_texts(Image.new("RGB", (8, 8)), []) == []


def test_one_candidate_gives_one_score(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    (score,) = vlm.score(QUERY, images[:1])
    assert 0.0 <= score <= 1.0


@pytest.mark.parametrize("method", ["vqa", "caption"])
def test_query_longer_than_the_context_is_refused_not_truncated(
    vlm: VisionLanguageModel, method: str
) -> None:
    too_long = " ".join(["circle"] * vlm.max_context)
    with pytest.raises(PromptTooLong, match="max_position_embeddings"):
        vlm.score(too_long, [Image.new("RGB", (32, 32))], method=method)


def test_empty_query_is_refused(vlm: VisionLanguageModel) -> None:
    with pytest.raises(EmptyQuery):
        vlm.score("  ", [Image.new("RGB", (32, 32))])


def test_unknown_method_is_refused_with_the_known_ones(vlm: VisionLanguageModel) -> None:
    with pytest.raises(UnknownScoreMethod, match="vqa, caption"):
        vlm.score(QUERY, [Image.new("RGB", (32, 32))], method="clip")


def test_grey_palette_alpha_and_tiny_images_are_scored(vlm: VisionLanguageModel) -> None:
    grey = Image.linear_gradient("L").resize((40, 40))
    palette = Image.new("RGB", (30, 20), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    images = [grey, palette, Image.new("RGBA", (20, 20), (0, 0, 0, 0)), Image.new("RGB", (1, 1), "red")]
    images.append(Image.new("RGB", (3, 500), "blue"))
    scores = vlm.score(QUERY, images)
    assert len(scores) == len(images)
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert scores[0] == pytest.approx(vlm.score(QUERY, [grey.convert("RGB")])[0], abs=1e-6)
    # Transparent pixels are flattened onto white, not black.
    assert scores[2] == pytest.approx(vlm.score(QUERY, [Image.new("RGB", (20, 20), "white")])[0], abs=1e-6)


def test_large_photos_are_shrunk_before_the_processor_and_score_alike(vlm: VisionLanguageModel) -> None:
    side = input_side(vlm.processor.image_processor)
    blotches = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    photo = Image.fromarray(blotches).resize((20 * side, 12 * side), Image.Resampling.BICUBIC)
    shrunk = prepare(photo, side)
    assert shrunk.size == (2 * side, math.ceil(12 * side / 10))  # reduced 10:1; a partial block counts
    assert prepare(Image.new("RGB", (side, side)), side).size == (side, side)  # small ones stay as they are
    # A whole factor: the longer side ends between 2 and 4 times the input side.
    odd = prepare(photo.resize((9 * side + 5, 3 * side)), side)
    assert odd.size == (math.ceil((9 * side + 5) / 4), math.ceil(3 * side / 4)) and 2 * side <= odd.width < 4 * side
    # The processor's own resize finishes the job: the score barely moves.
    assert vlm.score(QUERY, [photo])[0] == pytest.approx(hand_vqa_score(vlm, QUERY, photo), abs=0.01)
