"""Reciprocal-rank fusion: one ranking from several, by rank alone (Cormack et al., SIGIR 2009).

CLIP scores (cosines) and BM25 scores live on unrelated scales; fusing ranks needs no calibration between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from retriever.store import Hit

RRF_K0 = 60  # the paper's constant: damps the weight of the very first ranks


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], k0: int = RRF_K0) -> list[Hit]:
    """Every hit of any ranking, scored Σ 1/(k0 + rank) over the rankings that hold it (rank from 1), best first.

    Ties go by id. A hit keeps the payload of the first ranking that holds it; its score becomes the fused score.
    """
    if k0 < 0:
        raise ValueError(f"k0 must be at least 0, got {k0}")
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k0 + rank)
            first.setdefault(hit.id, hit)
    ordered = sorted(scores, key=lambda hit_id: (-scores[hit_id], hit_id))
    return [replace(first[hit_id], score=scores[hit_id]) for hit_id in ordered]
