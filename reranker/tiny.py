"""Build tiny DeepSeek-VL models offline: a word-level tokenizer, the released chat template, small configs.

The pieces are the real transformers classes, so a tiny model saved with `save_tiny_model` loads through
`reranker.loading.load_vlm` exactly as a released checkpoint does. Typical use (a test or a trainer):

    processor = build_tiny_processor(["red", "circle", "left", "of"], image_size=32)
    model = build_tiny_model(processor, seed=0)
    save_tiny_model(directory, model, processor)
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from reranker.prompts import DEFAULT_CAPTION_PROMPT, NO_VARIANTS, VQA_QUESTION, YES_VARIANTS

# The released tokenizer's special tokens (DeepSeek LLM): the chat template's end of turn is a real token.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜pad｜>"  # the release pads with EOS; a distinct id keeps EOS trainable when padding is masked
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image_placeholder>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# The chat template of deepseek-community/deepseek-vl-1.3b-chat and -7b-chat, verbatim from transformers'
# convert_deepseek_vl_weights_to_hf.py (adopted from deepseek-ai/DeepSeek-VL utils/conversation.py).
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}"
    "{% set i = 0 %}"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}"
    "User: "
    "{% elif message['role']|lower == 'assistant' %}"
    "Assistant:{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}"
    "{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<image_placeholder>"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}"
    "{{ text }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}"
    "{% else %}"
    "{{ seps[1] }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_PRE_TOKENIZER = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
)


def split_words(text: str) -> list[str]:
    """The tokens the tiny tokenizer sees in `text`: split on whitespace, each punctuation mark alone."""
    return [piece for piece, _ in _PRE_TOKENIZER.pre_tokenize_str(text)]


def prompt_words() -> list[str]:
    """Every word of the system prompt, the roles, the VQA question, the default caption prompt and Yes/No."""
    texts = [SYSTEM_PROMPT, "User: Assistant:", VQA_QUESTION.format(query=""), DEFAULT_CAPTION_PROMPT]
    words = [word for text in texts for word in split_words(text)]
    words += [variant.strip() for variant in (*YES_VARIANTS, *NO_VARIANTS)]
    return list(dict.fromkeys(words))


def build_tiny_tokenizer(words: Iterable[str], include_prompt_words: bool = True) -> PreTrainedTokenizerFast:
    """A case-sensitive word-level tokenizer: special tokens, ASCII punctuation, prompt words, then `words`.

    Each entry of `words` may be a phrase; it is split like text is (whitespace and punctuation). Ids are
    assigned in that order, so the same word list always gives the same ids. Adds BOS like the release does.
    """
    vocabulary = [*SPECIAL_TOKENS, *string.punctuation]
    if include_prompt_words:
        vocabulary += prompt_words()
    vocabulary += [piece for phrase in words for piece in split_words(phrase)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocabulary))}

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = _PRE_TOKENIZER
    # Words get a space before them, punctuation attaches to the word on its left: "a red circle, left of it."
    backend.decoder = decoders.Replace(Regex(r"^(?=[\w<])"), " ")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        padding_side="left",
    )


def build_tiny_processor(
    words: Sequence[str],
    image_size: int = 32,
    hybrid: bool = False,
    patch_size: int = 8,
    high_res_image_size: int = 64,
) -> DeepseekVLProcessor | DeepseekVLHybridProcessor:
    """A DeepSeek-VL (or hybrid) processor: tiny tokenizer, small image processor, the released chat template.

    `num_image_tokens` is (image_size // patch_size) ** 2, which `tiny_config_for` gives the vision tower too.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tokenizer = build_tiny_tokenizer(words)
    num_image_tokens = (image_size // patch_size) ** 2
    size = {"height": image_size, "width": image_size}
    if hybrid:
        hybrid_images = DeepseekVLHybridImageProcessor(
            size=size,
            high_res_size={"height": high_res_image_size, "width": high_res_image_size},
            image_mean=IMAGENET_STANDARD_MEAN,
            image_std=IMAGENET_STANDARD_STD,
            high_res_image_mean=OPENAI_CLIP_MEAN,
            high_res_image_std=OPENAI_CLIP_STD,
        )
        return DeepseekVLHybridProcessor(
            image_processor=hybrid_images,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            num_image_tokens=num_image_tokens,
        )
    images = DeepseekVLImageProcessor(
        size=size, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD
    )
    return DeepseekVLProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
    )


def tiny_config(
    vocab_size: int,
    image_size: int = 32,
    hybrid: bool = False,
    *,
    image_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    patch_size: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    high_res_image_size: int = 64,
    high_res_patch_size: int = 8,
    high_res_hidden_size: int = 32,
    high_res_output_channels: int = 16,
    high_res_layers: int = 2,
    high_res_heads: int = 2,
    high_res_window_size: int = 4,
    initializer_range: float = 0.02,
) -> DeepseekVLConfig | DeepseekVLHybridConfig:
    """A DeepSeek-VL config: LLaMA text, SigLIP vision tower (no head), for `hybrid` a SAM high-res tower.

    The defaults are tiny; pass the released sizes for architecture-size benchmarks. The vision tower makes
    (image_size // patch_size) ** 2 image features, which must equal the processor's `num_image_tokens`.
    """
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": initializer_range,
    }
    vision_config = {
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "gelu",
        "vision_use_head": False,
    }
    common: dict[str, Any] = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": image_token_id,
        "initializer_range": initializer_range,
    }
    if not hybrid:
        return DeepseekVLConfig(**common)
    high_res_config = {
        "hidden_size": high_res_hidden_size,
        "output_channels": high_res_output_channels,
        "num_hidden_layers": high_res_layers,
        "num_attention_heads": high_res_heads,
        "image_size": high_res_image_size,
        "patch_size": high_res_patch_size,
        "window_size": high_res_window_size,
        "global_attn_indexes": [high_res_layers - 1],
        "mlp_dim": 4 * high_res_hidden_size,
    }
    return DeepseekVLHybridConfig(**common, high_res_vision_config=high_res_config)


def is_hybrid_processor(processor: Any) -> bool:
    """Whether `processor` feeds the hybrid (SigLIP + SAM) model."""
    return isinstance(processor, DeepseekVLHybridProcessor)


def tiny_config_for(processor: Any, **sizes: Any) -> DeepseekVLConfig | DeepseekVLHybridConfig:
    """A tiny config matching `processor`: vocabulary, special token ids, image sizes, image token count."""
    tokenizer = processor.tokenizer
    image_size = int(processor.image_processor.size["height"])
    grid = math.isqrt(processor.num_image_tokens)
    if grid * grid != processor.num_image_tokens or image_size % grid:
        raise ValueError(
            f"num_image_tokens {processor.num_image_tokens} is not a square grid over {image_size} px"
        )
    hybrid = is_hybrid_processor(processor)
    if hybrid:
        sizes.setdefault("high_res_image_size", int(processor.image_processor.high_res_size["height"]))
    vocab_size = sizes.pop("vocab_size", len(tokenizer))  # larger is fine: ids past the tokenizer go unused
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return tiny_config(
        vocab_size=vocab_size,
        image_size=image_size,
        hybrid=hybrid,
        patch_size=image_size // grid,
        image_token_id=processor.image_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def build_tiny_model(
    processor: Any, seed: int = 0, **sizes: Any
) -> DeepseekVLForConditionalGeneration | DeepseekVLHybridForConditionalGeneration:
    """A randomly initialised model (seeded) of the class that matches `processor`, in eval mode."""
    config = tiny_config_for(processor, **sizes)
    model: DeepseekVLForConditionalGeneration | DeepseekVLHybridForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, DeepseekVLHybridConfig):
            model = DeepseekVLHybridForConditionalGeneration(config)
        else:
            model = DeepseekVLForConditionalGeneration(config)
    return model.eval()


def save_tiny_model(
    directory: str | Path, model: Any, processor: Any, score_method: str | None = None
) -> Path:
    """`save_pretrained` model and processor, plus `vlsearch.json` if a score method is preferred."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if score_method is not None:
        (directory / "vlsearch.json").write_text(json.dumps({"score_method": score_method}, indent=2) + "\n")
    return directory
