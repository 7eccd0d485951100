"""Keyword search shared by both stores: the words of a payload, the words of a query, and their BM25 score.

Both stores index the same pre-tokenised text (tokens joined by spaces), so SQLite FTS5 and Qdrant's text index
see identical words, and both rank with the BM25 below (Qdrant's variant: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
which never goes negative for common words). The same query therefore ranks alike on either store.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from retriever.store import Payload

# Qdrant's default word tokenizer: runs of letters and digits, lowercased; "_" and punctuation separate words,
# so "2019_Lisbon-trip/IMG_001.jpg" gives 2019, lisbon, trip, img, 001, jpg.
_WORD = re.compile(r"[^\W_]+")

BM25_K1 = 1.2  # term-frequency saturation
BM25_B = 0.75  # document-length normalisation


def tokens(text: str) -> list[str]:
    """The words of text, lowercased, in order."""
    return [word.lower() for word in _WORD.findall(text)]


def query_terms(text: str) -> list[str]:
    """The distinct words of a query, in first-seen order (a repeated word counts once)."""
    return list(dict.fromkeys(tokens(text)))


def payload_words(payload: Payload) -> list[str]:
    """The searchable words of an image: its file paths (every folder and the file name), tags and captions."""
    texts: list[str] = [str(path) for path in payload.get("paths") or []]
    texts += [str(tag) for tag in payload.get("tags") or []]
    captions = payload.get("captions") or {}
    if isinstance(captions, Mapping):
        texts += [str(caption) for caption in captions.values()]
    return [word for text in texts for word in tokens(text)]


def payload_text(payload: Payload) -> str:
    """The text both stores index for a payload: its words joined by single spaces ("" when it has none)."""
    return " ".join(payload_words(payload))


def idf(documents: int, containing: int) -> float:
    """Inverse document frequency of a word found in `containing` of `documents` documents."""
    return math.log((documents - containing + 0.5) / (containing + 0.5) + 1.0)


def bm25(document: Sequence[str], weights: Mapping[str, float], average_length: float) -> float:
    """BM25 of one document (its words) for query words weighted by their idf."""
    counts = Counter(document)
    norm = BM25_K1 * (1.0 - BM25_B + BM25_B * len(document) / average_length)
    score = 0.0
    for term, weight in weights.items():
        tf = counts.get(term, 0)
        if tf:
            score += weight * tf * (BM25_K1 + 1.0) / (tf + norm)
    return score
