"""Tiny DeepSeek-VL builders: word-level tokenizer, released chat template, consistent image token counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from reranker.model import VisionLanguageModel
from reranker.tiny import (
    SYSTEM_PROMPT,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_model,
    split_words,
    tiny_config_for,
)
from tests.reranker.tiny_models import WORDS

VQA_PROMPT = 'Does this figure show "a red circle left of a blue square"? Please answer yes or no.'


def conversation(text: str) -> Any:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_chat_template_renders_the_released_prompt_format() -> None:
    processor = build_tiny_processor(WORDS)
    prompt = processor.apply_chat_template(
        conversation(VQA_PROMPT), add_generation_prompt=True, tokenize=False
    )
    assert prompt == f"{SYSTEM_PROMPT}\n\nUser: <image_placeholder>{VQA_PROMPT}\n\nAssistant:"


@pytest.mark.parametrize("hybrid", [False, True])
def test_prompts_of_listed_words_tokenise_without_unknowns(hybrid: bool) -> None:
    processor = build_tiny_processor(WORDS, hybrid=hybrid)
    tokenizer = processor.tokenizer
    for text in (VQA_PROMPT, "Describe the image in one short sentence."):
        prompt = processor.apply_chat_template(conversation(text), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(processor.image_token_id) == 1
    for answer in ("Yes", "No", "yes", "no"):
        assert tokenizer.convert_tokens_to_ids(answer) != tokenizer.unk_token_id


def test_tokenizer_is_case_sensitive_and_splits_punctuation() -> None:
    tokenizer = build_tiny_tokenizer(["red circle"])
    assert split_words('a "red" circle, left.') == ["a", '"', "red", '"', "circle", ",", "left", "."]
    assert tokenizer.tokenize("red, circle") == ["red", ",", "circle"]
    ids = tokenizer("Red circle", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.unk_token_id
    assert ids[1] != tokenizer.unk_token_id


def test_decoding_joins_words_and_attaches_punctuation() -> None:
    tokenizer = build_tiny_tokenizer(WORDS)
    text = "a red circle, left of a blue square."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert str(tokenizer.decode(ids)).strip() == text


def test_same_word_list_gives_same_ids() -> None:
    first, second = build_tiny_tokenizer(WORDS), build_tiny_tokenizer(list(WORDS))
    assert first.get_vocab() == second.get_vocab()
    assert build_tiny_tokenizer([*WORDS, "hexagon"]).get_vocab()["circle"] == first.get_vocab()["circle"]


@pytest.mark.parametrize("hybrid", [False, True])
def test_model_makes_as_many_image_features_as_the_processor_has_image_tokens(hybrid: bool) -> None:
    processor = build_tiny_processor(WORDS, image_size=32, patch_size=8, hybrid=hybrid)
    model: Any = build_tiny_model(processor)
    pixels = processor.image_processor([Image.new("RGB", (50, 20))], return_tensors="pt")
    with torch.inference_mode():
        features = model.model.get_image_features(**pixels, return_dict=True).pooler_output
    assert processor.num_image_tokens == 16
    assert features.shape == (1, processor.num_image_tokens, model.config.text_config.hidden_size)
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_same_seed_builds_the_same_weights() -> None:
    processor = build_tiny_processor(WORDS)
    first, second = build_tiny_model(processor, seed=3), build_tiny_model(processor, seed=3)
    third = build_tiny_model(processor, seed=4)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])
    assert not torch.equal(first.lm_head.weight, third.lm_head.weight)


def test_sizes_reach_the_config() -> None:
    processor = build_tiny_processor(WORDS, hybrid=True)
    config: Any = tiny_config_for(
        processor, hidden_size=48, num_layers=3, max_position_embeddings=256, vocab_size=1000
    )
    assert config.text_config.vocab_size == 1000  # room for words a trainer adds later
    assert config.text_config.hidden_size == 48
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.max_position_embeddings == 256
    assert config.high_res_vision_config.image_size == 64
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config_for(processor, vocab_size=10)


def test_saved_tiny_model_scores_like_the_one_in_memory(tmp_path: Path) -> None:
    processor = build_tiny_processor(WORDS, hybrid=True)
    model = build_tiny_model(processor, seed=0, initializer_range=0.1)
    in_memory = VisionLanguageModel.from_components(model, processor)
    from_disk = VisionLanguageModel(str(save_tiny_model(tmp_path / "m", model, processor)))
    images = [Image.new("RGB", (32, 32), "green"), Image.new("RGB", (20, 32), "red")]
    for method in ("vqa", "caption"):
        expected = in_memory.score("a red circle", images, method=method)
        assert from_disk.score("a red circle", images, method=method) == pytest.approx(expected, abs=1e-6)
    assert in_memory.identity.startswith("sha256:")
    other = VisionLanguageModel.from_components(build_tiny_model(processor, seed=1), processor)
    assert other.identity != in_memory.identity
