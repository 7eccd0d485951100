"""DeepSeek-VL: relevance scoring (rerank), captions, visual questions and tag verification."""

from reranker import quantization  # noqa: F401  (first: it quiets a log line of torchao's import)
from reranker.errors import EmptyQuery, PromptTooLong, UnknownScoreMethod, UnsupportedModel
from reranker.model import VisionLanguageModel, get_model
from reranker.scoring import SCORE_METHODS
from reranker.tags import verify_tags

__all__ = [
    "SCORE_METHODS",
    "EmptyQuery",
    "PromptTooLong",
    "UnknownScoreMethod",
    "UnsupportedModel",
    "VisionLanguageModel",
    "get_model",
    "verify_tags",
]
