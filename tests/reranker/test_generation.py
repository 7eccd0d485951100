"""Captions and answers: bounded greedy generation, in input order, plain text without template artefacts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image

from reranker.errors import EmptyQuery
from reranker.model import VisionLanguageModel
from reranker.prompts import clean_generated_text
from reranker.tiny import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN

ARTEFACTS = ("Assistant:", "User:", "<image_placeholder>", "<｜", "You are a helpful")


@contextmanager
def scripted(vlm: VisionLanguageModel, tokens: Sequence[str]) -> Iterator[None]:
    """Make the language model's next token follow `tokens`, one per forward pass (the last one repeats)."""
    ids = vlm.processor.tokenizer.convert_tokens_to_ids(list(tokens))
    steps = itertools.count()

    def force(module: Any, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        wanted = ids[min(next(steps), len(ids) - 1)]
        logits = logits.clone()
        logits[:, -1, :] = -1e4
        logits[:, -1, wanted] = 1e4
        return logits

    handle = vlm.model.lm_head.register_forward_hook(force)
    try:
        yield
    finally:
        handle.remove()


def test_caption_stops_at_max_new_tokens(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    with scripted(vlm, ["red"]):
        captions = vlm.caption(images[:2], max_new_tokens=5)
    assert captions == ["red red red red red"] * 2


def test_caption_stops_at_the_end_token(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    with scripted(vlm, ["a", "red", "circle", EOS_TOKEN, "blue"]):
        assert vlm.caption(images[:1], max_new_tokens=8) == ["a red circle"]


def test_echoed_role_and_a_following_turn_are_cut(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    script = ["Assistant", ":", "a", "red", "circle", ".", "User", ":", "blue", "square"]
    with scripted(vlm, script):
        assert vlm.caption(images[:1], max_new_tokens=len(script)) == ["a red circle."]


def test_special_and_image_tokens_never_reach_the_text(
    vlm: VisionLanguageModel, images: list[Image.Image]
) -> None:
    with scripted(vlm, ["a", BOS_TOKEN, "red", PAD_TOKEN, IMAGE_TOKEN, "circle"]):
        (caption,) = vlm.caption(images[:1], max_new_tokens=6)
    assert "<" not in caption
    assert caption.startswith("a red")


def test_random_model_captions_are_bounded_plain_text_in_input_order(
    vlm: VisionLanguageModel, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vlm, "chunk_size", 3)
    captions = vlm.caption(images, max_new_tokens=6)
    assert len(captions) == len(images)
    assert len(set(captions)) > 1  # distinct, so a wrong order could not pass
    assert captions == [vlm.caption([image], max_new_tokens=6)[0] for image in images]
    tokenizer = vlm.processor.tokenizer
    for caption in captions:
        assert caption == caption.strip()
        assert not any(artefact in caption for artefact in ARTEFACTS)
        assert len(tokenizer(caption, add_special_tokens=False)["input_ids"]) <= 6


def test_caption_of_no_images_is_empty(vlm: VisionLanguageModel) -> None:
    assert vlm.caption([]) == []


def test_ask_returns_the_answer_text(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    with scripted(vlm, ["Yes", ",", "a", "circle", EOS_TOKEN]):
        assert vlm.ask(images[0], "Is there a circle?") == "Yes, a circle"


def test_ask_with_an_empty_question_is_refused(vlm: VisionLanguageModel, images: list[Image.Image]) -> None:
    with pytest.raises(EmptyQuery):
        vlm.ask(images[0], " ")


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("  a red circle.  ", "a red circle."),
        ("Assistant: a red circle", "a red circle"),
        ("Assistant : Assistant: a red circle", "a red circle"),
        ("a red circle\n\nUser: and now?", "a red circle"),
        ("a red circle User : more", "a red circle"),
        ("the assistant: is not a role marker", "the assistant: is not a role marker"),
        ("User: hi", ""),
    ],
)
def test_generated_text_is_cleaned_of_role_markers(generated: str, expected: str) -> None:
    assert clean_generated_text(generated) == expected
