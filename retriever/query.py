"""Queries: text, image (upload or stored id) or both, with negative text -> one vector -> ranked (reranked) hits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

import numpy as np
from PIL import Image

from indexer.encoder import ClipEncoder
from retriever.errors import InvalidQuery
from retriever.fusion import reciprocal_rank_fusion
from retriever.store import Filter, Hit, PayloadUpdate, VectorStore

_T = TypeVar("_T")
MAX_RERANK_K = 200  # the generative model scores each candidate: bound the cost of one query
SearchMode = Literal["clip", "keyword", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = ("clip", "keyword", "hybrid")
SortOrder = Literal["relevance", "date"]
SORT_ORDERS: tuple[SortOrder, ...] = ("relevance", "date")
# Hybrid fuses at least this many hits of each ranking, so a page does not depend on how deep it lies while
# offset + k stays within it (a deeper page fuses deeper lists).
HYBRID_DEPTH = 100
IMAGE_WORKERS = 4  # threads that decode candidates when the caller does not say (settings.image_workers)


class Scorer(Protocol):
    """Anything that scores (query, image) pairs, higher = more relevant (the reranker, or a test's stand-in)."""

    def score(self, query: str, images: Sequence[Image.Image]) -> list[float]: ...


class Captioner(Protocol):
    """Anything that captions images; `identity` keys the caption cache in the payload."""

    @property
    def identity(self) -> str: ...

    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


ImageLoader = Callable[[Hit], Image.Image]


@dataclass(frozen=True)
class Query:
    """What to look for and how to rank it. `mode`: clip (embeddings), keyword (BM25 over paths, tags and
    captions) or hybrid (reciprocal-rank fusion of both); min_score bounds the CLIP score."""

    text: str | None = None
    image: Image.Image | None = None  # a decoded image (file or upload)
    image_id: str | None = None  # or a stored image, by id
    text_weight: float = 1.0
    image_weight: float = 1.0
    negative: str | None = None  # pushes results away from this text
    negative_weight: float = 0.5
    k: int = 10
    offset: int = 0
    min_score: float | None = None
    filter: Filter | None = None
    rerank: bool = False
    rerank_k: int = 20
    fusion_weight: float = 1.0  # 1.0 = order by rerank score alone; 0.0 = by CLIP alone; between: fused
    captions: bool = False
    mode: SearchMode = "clip"
    # drop candidates whose P("Yes") (the generative model's vqa score) is below this; implies reranking the top
    # rerank_k, and each hit carries its `relevance`
    min_relevance: float | None = None
    # relevance: by score (reranked when asked); date: what passed min_score / min_relevance, newest `taken` first
    # (images without one last), before offset and k
    sort: SortOrder = "relevance"

    @property
    def reranks(self) -> bool:
        return self.rerank or self.min_relevance is not None


def validate(query: Query, max_k: int) -> None:
    """Refuse queries that cannot be answered as asked, with a message saying why."""
    if query.mode not in SEARCH_MODES:
        raise InvalidQuery(f"mode must be one of {', '.join(SEARCH_MODES)}, got {query.mode!r}")
    if not query.text and query.image is None and query.image_id is None:
        raise InvalidQuery("a query needs text, an image or an image id")
    if query.mode != "clip" and not query.text:
        raise InvalidQuery(f"{query.mode} mode needs query text: it matches words of file names, tags and captions")
    if query.mode == "keyword" and (query.image is not None or query.image_id or query.negative):
        raise InvalidQuery("keyword mode matches words only: use hybrid mode to add an image or a negative text")
    if query.mode == "keyword" and query.min_score is not None:
        raise InvalidQuery("min_score bounds the CLIP score: it applies to clip and hybrid modes, not keyword")
    if not 1 <= query.k <= max_k:
        raise InvalidQuery(f"k must be between 1 and {max_k}, got {query.k}")
    if query.offset < 0:
        raise InvalidQuery(f"offset must be >= 0, got {query.offset}")
    if query.sort not in SORT_ORDERS:
        raise InvalidQuery(f"sort must be one of {', '.join(SORT_ORDERS)}, got {query.sort!r}")
    if query.min_relevance is not None:
        if not 0.0 <= query.min_relevance <= 1.0:  # NaN fails both comparisons
            raise InvalidQuery(f"min_relevance must be between 0 and 1, got {query.min_relevance}")
        if not query.text:
            raise InvalidQuery('min_relevance needs query text: it bounds P("Yes") of the generative model')
    if query.reranks:
        if not query.text:
            raise InvalidQuery("rerank needs query text: the generative model scores (text, image) pairs")
        if not 1 <= query.rerank_k <= MAX_RERANK_K:
            raise InvalidQuery(f"rerank_k must be between 1 and {MAX_RERANK_K}, got {query.rerank_k}")
    if not 0.0 <= query.fusion_weight <= 1.0:
        raise InvalidQuery(f"fusion_weight must be between 0 and 1, got {query.fusion_weight}")


def query_vector(query: Query, encoder: ClipEncoder, store: VectorStore) -> np.ndarray:
    """The weighted sum of the normalised text and image vectors, minus the negative text's, normalised."""
    store.manifest.check_encoder(encoder.name, encoder.identity, encoder.dim)
    parts: list[np.ndarray] = []
    if query.text:
        parts.append(query.text_weight * encoder.encode_texts([query.text])[0])
    if query.image is not None:
        parts.append(query.image_weight * encoder.encode_pil([query.image])[0])
    if query.image_id is not None:
        records = store.get([query.image_id], with_vectors=True)
        if not records or records[0].vector is None:
            raise InvalidQuery(f"no image with id {query.image_id!r} in collection {store.name!r}")
        parts.append(query.image_weight * records[0].vector)
    if query.negative:
        parts.append(-query.negative_weight * encoder.encode_texts([query.negative])[0])
    vector = np.sum(parts, axis=0)
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise InvalidQuery("the query's parts cancel out (weights sum to a zero vector)")
    return (vector / norm).astype(np.float32)


def search(
    store: VectorStore,
    encoder: ClipEncoder,
    query: Query,
    max_k: int = 1000,
    scorer: Scorer | None = None,
    captioner: Captioner | None = None,
    load_hit_image: ImageLoader | None = None,
    image_workers: int = IMAGE_WORKERS,
    relevance_scorer: Scorer | None = None,
) -> list[Hit]:
    """Hits offset..offset+k of the query's mode, or among its top rerank_k by the scorer (fused if asked).

    relevance_scorer: P("Yes") in [0, 1], for min_relevance; when it is `scorer` itself (its method is already
    vqa) the rerank scores are reused, else it scores the candidates once more. sort=date orders the candidates
    (the top rerank_k when reranking, else the top max(max_k, offset + k)) that passed the bounds by `taken`.
    Captions asked for are cached in the payloads as field updates; nothing here saves the index."""
    validate(query, max_k)
    window = query.offset + query.k
    if query.reranks:
        window = max(query.rerank_k, window)
    elif query.sort == "date":
        window = max(max_k, window)  # a page of the date order does not depend on how deep it lies
    hits = ranking(store, encoder, query, window)
    if query.reranks:
        hits = rerank(
            query.text or "", hits, _require(scorer), _require(load_hit_image), query.fusion_weight, image_workers
        )
    if query.min_relevance is not None:
        hits = with_relevance(query.text or "", hits, scorer, _require(relevance_scorer), _require(load_hit_image),
                              image_workers)
        hits = [hit for hit in hits if hit.relevance is not None and hit.relevance >= query.min_relevance]
    if query.sort == "date":
        hits = by_date(hits)
    hits = hits[query.offset : query.offset + query.k]
    if query.captions:
        add_captions(store, hits, _require(captioner), _require(load_hit_image), image_workers)
    return hits


def ranking(store: VectorStore, encoder: ClipEncoder, query: Query, depth: int) -> list[Hit]:
    """The best `depth` hits of the query's mode, from the first: by CLIP score, by BM25, or both fused by rank.

    A query by stored image id never returns that image ("more like this one").
    """
    extra = 0 if query.image_id is None else 1  # fetch one more to make up for the query image
    lists_depth = max(depth, HYBRID_DEPTH) if query.mode == "hybrid" else depth

    def clip() -> list[Hit]:
        vector = query_vector(query, encoder, store)
        hits = store.search(vector, lists_depth + extra, query.filter, query.min_score)
        return [hit for hit in hits if hit.id != query.image_id][:lists_depth]

    def keyword() -> list[Hit]:
        hits = store.keyword_search(query.text or "", lists_depth + extra, query.filter)
        return [hit for hit in hits if hit.id != query.image_id][:lists_depth]

    if query.mode == "clip":
        return clip()
    if query.mode == "keyword":
        return keyword()
    return reciprocal_rank_fusion([clip(), keyword()])[:depth]


def _require(component: _T | None) -> _T:
    if component is None:
        raise InvalidQuery("rerank, min_relevance or captions were asked for but no generative model is configured")
    return component


def rerank(
    text: str,
    hits: list[Hit],
    scorer: Scorer,
    load_hit_image: ImageLoader,
    fusion_weight: float,
    workers: int = IMAGE_WORKERS,
) -> list[Hit]:
    """Score every hit with the scorer (one batched call) and order by the fused score."""
    if not hits:
        return []
    rerank_scores = scorer.score(text, load_images(load_hit_image, hits, workers))
    fused = fuse_scores([hit.score for hit in hits], rerank_scores, fusion_weight)
    ranked = [
        replace(hit, rerank_score=float(r), final_score=float(f))
        for hit, r, f in zip(hits, rerank_scores, fused, strict=True)
    ]
    return sorted(ranked, key=lambda hit: (-(hit.final_score or 0.0), hit.id))


def with_relevance(
    text: str,
    hits: list[Hit],
    scorer: Scorer | None,
    relevance_scorer: Scorer,
    load_hit_image: ImageLoader,
    workers: int = IMAGE_WORKERS,
) -> list[Hit]:
    """The hits with `relevance` (P("Yes")): their rerank score when the rerank scorer is the relevance scorer,
    else one more batched call of the relevance scorer."""
    if not hits:
        return []
    if relevance_scorer is scorer and all(hit.rerank_score is not None for hit in hits):
        scores = [float(hit.rerank_score or 0.0) for hit in hits]
    else:
        scores = [float(s) for s in relevance_scorer.score(text, load_images(load_hit_image, hits, workers))]
    return [replace(hit, relevance=score) for hit, score in zip(hits, scores, strict=True)]


def by_date(hits: list[Hit]) -> list[Hit]:
    """Newest payload `taken` first, hits without one last; ties keep their relevance order (a stable sort)."""
    dated = sorted((hit for hit in hits if isinstance(hit.payload.get("taken"), str)),
                   key=lambda hit: str(hit.payload["taken"]), reverse=True)
    return dated + [hit for hit in hits if not isinstance(hit.payload.get("taken"), str)]


def load_images(load_hit_image: ImageLoader, hits: list[Hit], workers: int = IMAGE_WORKERS) -> list[Image.Image]:
    """The hits' images in hit order, decoded by up to `workers` threads at once (decoders release the GIL):
    reranking 20 photos waits for the slowest decode, not for the sum of them. The first failure is raised, as one
    by one would. Every API or worker process has its own pool, so `workers` comes from settings, not all cores."""
    if len(hits) < 2 or workers < 2:
        return [load_hit_image(hit) for hit in hits]
    with ThreadPoolExecutor(max_workers=min(len(hits), workers)) as pool:
        return list(pool.map(load_hit_image, hits))


def fuse_scores(clip: Sequence[float], rerank: Sequence[float], weight: float) -> list[float]:
    """weight·z(rerank) + (1−weight)·z(clip), z-scored within the candidates; weight 1 keeps the raw rerank score.

    The two scores live on different scales (a probability or a log-likelihood against a cosine), so fusion compares
    standardised scores; at weight 1 the rerank score is returned unchanged so that it stays interpretable.
    """
    if weight >= 1.0:
        return [float(r) for r in rerank]
    return list(weight * _zscore(rerank) + (1.0 - weight) * _zscore(clip))


def _zscore(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    spread = array.std()
    return (array - array.mean()) / spread if spread > 0 else np.zeros_like(array)


def add_captions(
    store: VectorStore,
    hits: list[Hit],
    captioner: Captioner,
    load_hit_image: ImageLoader,
    workers: int = IMAGE_WORKERS,
) -> None:
    """Fill payload["captions"][model identity] for hits that lack it (one batched call), caching each caption in
    the store as one field update (other fields, and other models' captions, written meanwhile stay)."""
    key = captioner.identity
    missing = [hit for hit in hits if key not in (hit.payload.get("captions") or {})]
    if not missing:
        return
    captions = captioner.caption(load_images(load_hit_image, missing, workers))
    updates = {hit.id: PayloadUpdate(captions={key: caption}) for hit, caption in zip(missing, captions, strict=True)}
    stored = store.update_payloads(updates)
    for hit in missing:
        # the payload as stored now; an image deleted meanwhile keeps its caption in this answer only
        hit.payload = stored.get(hit.id) or updates[hit.id].apply(hit.payload)
