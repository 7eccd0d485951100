"""Relevance scores from DeepSeek-VL logits: VQAScore (P("Yes")) and VisualGPTScore (text log-likelihood).

Tensor-level pieces only; `reranker.model.VisionLanguageModel` builds the prompts and feeds the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

VQA = "vqa"
CAPTION = "caption"
SCORE_METHODS: tuple[str, ...] = (VQA, CAPTION)


@torch.inference_mode()
def image_features(model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Aligned image embeddings (images, image tokens, text hidden size): vision tower(s) and aligner."""
    return model.model.get_image_features(**pixel_inputs, return_dict=True).pooler_output


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows: each row ends in the last column.

    Positions count real tokens only, so a padded row gets the same positions (and scores) as it would alone.
    """
    width = max(len(row) for row in rows)
    # one list of lists into one tensor: a tensor per row costs more than the tiny model's layers at batch 20
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


def shared_prefix_length(rows: Sequence[Sequence[int]], image_token_id: int) -> int:
    """How many leading tokens (all before the first image token) every row shares, when the rows are of one
    length and so unpadded: the system prompt and "User:" that `forward_with_features` runs once. 0 otherwise."""
    if len(rows) < 2 or any(len(row) != len(rows[0]) for row in rows):
        return 0
    first = list(rows[0])
    if image_token_id not in first:
        return 0
    length = first.index(image_token_id)
    return length if all(list(row[:length]) == first[:length] for row in rows[1:]) else 0


@torch.inference_mode()
def forward_with_features(
    model: Any,
    inputs: dict[str, torch.Tensor],
    features: torch.Tensor,
    logits_to_keep: int,
    prefix_length: int = 0,
) -> torch.Tensor:
    """Logits of the last `logits_to_keep` positions, the image tokens filled with precomputed `features`.

    With `prefix_length` (from `shared_prefix_length`), the rows' common prefix runs once and its keys and
    values serve every row: the same logits for a fraction of the work when candidates share one prompt.
    """
    encoded = BaseModelOutputWithPooling(pooler_output=features)
    if prefix_length == 0:
        output = model(
            **inputs, mm_encoder_outputs={"image": encoded}, logits_to_keep=logits_to_keep, use_cache=False
        )
        return output.logits
    rows = inputs["input_ids"].shape[0]
    cache = DynamicCache(config=model.config.text_config)
    model.model.language_model(input_ids=inputs["input_ids"][:1, :prefix_length], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    output = model(
        input_ids=inputs["input_ids"][:, prefix_length:],
        # Rows that share a prefix are of one length (shared_prefix_length): no padding to mask, and one row of
        # positions serves them all (the rotary tables are made once, not per row). The same logits, sooner.
        position_ids=inputs["position_ids"][:1, prefix_length:],
        cache=cache,
        mm_encoder_outputs={"image": encoded},
        logits_to_keep=logits_to_keep,
        use_cache=True,
    )
    return output.logits


def yes_probability(
    last_logits: torch.Tensor,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    calibration: tuple[float, float] | None = None,
) -> torch.Tensor:
    """VQAScore: sum P(yes variants) / (sum P(yes variants) + sum P(no variants)), next-token softmax.

    The softmax denominator cancels, so this is sigmoid(logsumexp(yes logits) - logsumexp(no logits)),
    computed in float32. `last_logits` is (rows, vocab). `calibration` (scale, bias), from the checkpoint's
    vlsearch.json, maps those log-odds to sigmoid(scale * log-odds + bias): Platt scaling fitted on held-out
    pairs, so that P("Yes") = 0.7 is right seven times in ten. The order of scores is unchanged when scale > 0.
    """
    logits = last_logits.float()
    yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    log_odds = yes - no
    if calibration is not None:
        log_odds = calibration[0] * log_odds + calibration[1]
    return torch.sigmoid(log_odds)


def answer_log_likelihood(logits: torch.Tensor, answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """VisualGPTScore: per row, the mean log-probability of its answer tokens, which end the left-padded row.

    `logits` are the last max(len(answer)) + 1 positions, as `logits_to_keep` gives them: position j predicts
    token j + 1, so the final position (after the answer) is not used.
    """
    longest = max(len(answer) for answer in answers)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if log_probs.shape[1] != longest:
        raise ValueError(f"expected logits for {longest + 1} positions, got {logits.shape[1]}")
    targets = torch.zeros((len(answers), longest), dtype=torch.long)
    mask = torch.zeros((len(answers), longest), dtype=torch.float32)
    for index, answer in enumerate(answers):
        targets[index, longest - len(answer) :] = torch.tensor(answer, dtype=torch.long)
        mask[index, longest - len(answer) :] = 1.0
    targets, mask = targets.to(log_probs.device), mask.to(log_probs.device)
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    return token_log_probs.sum(-1) / mask.sum(-1)
