"""Errors a user can meet with the generative model; each message names the file or setting to change."""

from __future__ import annotations

from typing import ClassVar

from indexer.errors import ErrorCategory, InvalidSetting, VlsearchError


class UnsupportedModel(VlsearchError):
    """The checkpoint is not DeepSeek-VL, or its tokenizer cannot express the answers the scorer reads."""


class UnknownScoreMethod(VlsearchError):
    """A relevance score method other than the ones `reranker.scoring.SCORE_METHODS` names."""


class PromptTooLong(VlsearchError):
    """A query (or question) that does not fit, with its prompt, in the model's context."""

    category: ClassVar[ErrorCategory] = "too_large"


class EmptyQuery(VlsearchError):
    """A query or tag with no text to score."""


class UnsupportedQuantization(InvalidSetting, ValueError):
    """A VLSEARCH_VLM_QUANTIZATION that cannot work here: unknown, not on this device, or its library missing."""
