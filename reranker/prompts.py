"""The prompts vlsearch asks DeepSeek-VL, rendered through the checkpoint's own chat template."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

Turn = tuple[str, str]  # an earlier (question, answer) of a conversation about one image

VQA_QUESTION = 'Does this figure show "{query}"? Please answer yes or no.'
DEFAULT_CAPTION_PROMPT = "Describe the image in one short sentence."

# P(Yes) sums whichever of these exist as single tokens: BPE vocabularies hold " Yes" (after "Assistant:")
# and often "Yes" too; a word-level vocabulary holds only "Yes".
YES_VARIANTS: tuple[str, ...] = ("Yes", " Yes")
NO_VARIANTS: tuple[str, ...] = ("No", " No")

# A model that misses its end token runs on into a new turn ("...\n\nUser: ..."); some echo their own role.
_ROLE_MARKER = re.compile(r"\b(?:User|Assistant)\s*:")
_OWN_ROLE = re.compile(r"Assistant\s*:")


def user_turn(text: str) -> list[dict[str, Any]]:
    """One user message holding the image, then `text` (the released DeepSeek-VL chat order)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def render_prompt(processor: Any, text: str) -> str:
    """The chat-formatted prompt for one image and `text`, ending where the assistant's answer starts."""
    prompt: str = processor.apply_chat_template(user_turn(text), add_generation_prompt=True, tokenize=False)
    return prompt


def conversation(turns: Sequence[Turn], question: str) -> list[dict[str, Any]]:
    """Messages of a conversation about one image: earlier (question, answer) turns, then `question`.

    The image goes once, first in the first user message, as the released DeepSeek-VL chat shows it.
    """
    messages: list[dict[str, Any]] = []
    for asked, answered in turns:
        messages += _user_message(asked, with_image=not messages)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
    return messages + _user_message(question, with_image=not messages)


def render_conversation(processor: Any, turns: Sequence[Turn], question: str) -> str:
    """The chat-formatted prompt of `conversation(turns, question)`, ending where the assistant's answer starts.

    In the released format: system prompt, "\n\n", then "User: <image_placeholder>q1\n\nAssistant: a1" +
    end of sentence + "User: q2\n\nAssistant:" (deepseek_vl/utils/conversation.py, template "deepseek").
    """
    prompt: str = processor.apply_chat_template(
        conversation(turns, question), add_generation_prompt=True, tokenize=False
    )
    return prompt


def _user_message(text: str, with_image: bool) -> list[dict[str, Any]]:
    if with_image:
        return user_turn(text)
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def expand_image_tokens(prompt: str, processor: Any) -> str:
    """The image placeholder repeated once per image feature, as the processor expands it."""
    return prompt.replace(processor.image_token, processor.image_token * processor.num_image_tokens)


def single_token_ids(tokenizer: Any, variants: Sequence[str]) -> list[int]:
    """Ids of those `variants` that the tokenizer encodes as exactly one known token, without duplicates."""
    ids: list[int] = []
    for variant in variants:
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def clean_generated_text(text: str) -> str:
    """Plain answer text: no role marker echoed first, nothing of a following turn, no outer whitespace."""
    text = text.strip()
    while (leading := _OWN_ROLE.match(text)) is not None:
        text = text[leading.end() :].lstrip()
    following = _ROLE_MARKER.search(text)
    if following is not None:
        text = text[: following.start()]
    return text.strip()
