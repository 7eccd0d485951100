"""Tag verification: keep the candidate tags that the generative model confirms for an image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from PIL import Image

from reranker.scoring import VQA

DEFAULT_VQA_THRESHOLD = 0.5


class TextScorer(Protocol):
    """Anything that scores texts against one image, as VisionLanguageModel.score_texts does."""

    @property
    def score_method(self) -> str: ...

    @property
    def tag_prompt(self) -> str: ...

    @property
    def tag_threshold(self) -> float | None: ...

    def score_texts(
        self, image: Image.Image, texts: Sequence[str], method: str | None = None
    ) -> list[float]: ...


def verify_tags(
    model: TextScorer,
    image: Image.Image,
    tags: Sequence[str],
    threshold: float | Mapping[str, float] | None = None,
    method: str | None = None,
    prompt: str | None = None,
) -> list[str]:
    """The tags (in input order, once each) whose score for `image` reaches their threshold.

    Each tag is scored as `prompt` with `{label}` replaced (default: the model's tag_prompt, from its checkpoint's
    vlsearch.json, else the tag itself). `threshold` is one value or one per tag; tags without their own get the
    checkpoint's tag_threshold under its own score method, else 0.5 under the vqa method (P("Yes")). The caption
    method's log-likelihoods have no natural cut, so it needs a threshold from the checkpoint or the caller.
    """
    unique = list(dict.fromkeys(tags))
    if not unique:
        return []
    chosen = method or model.score_method
    default = model.tag_threshold if chosen == model.score_method else None
    if default is None and chosen == VQA:
        default = DEFAULT_VQA_THRESHOLD
    limits: dict[str, float | None] = {}
    for tag in unique:
        if isinstance(threshold, Mapping):
            limits[tag] = threshold.get(tag, default)
        else:
            limits[tag] = default if threshold is None else threshold
    missing = [tag for tag, limit in limits.items() if limit is None]
    if missing:
        raise ValueError(f"score method {chosen!r} has no default threshold; give one for {missing}")
    template = prompt or model.tag_prompt
    scores = model.score_texts(image, [template.replace("{label}", tag) for tag in unique], method=chosen)
    return [tag for tag, score in zip(unique, scores, strict=True) if score >= limits[tag]]  # type: ignore[operator]
