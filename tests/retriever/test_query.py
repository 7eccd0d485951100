"""Query building and rerank wiring (random tiny weights: arithmetic and ordering, not quality)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.container import Container
from indexer.decode import load_image
from indexer.pipeline import index_images
from indexer.sources import iter_sources
from retriever.errors import InvalidQuery
from retriever.query import Query, fuse_scores, query_vector, search
from retriever.store import Hit, VectorStore


@pytest.fixture
def indexed(container: Container, image_folder: Path) -> VectorStore:
    encoder = container.encoder()
    store = container.create_or_open_store("q", encoder)
    index_images(iter_sources([image_folder]), encoder, store, batch_size=4, workers=2)
    return store


def load_hit(hit: Hit) -> Image.Image:
    assert hit.path is not None
    return load_image(Path(hit.path)).image


def normalised(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_combined_query_is_the_normalised_weighted_sum(
    container: Container, indexed: VectorStore, image_folder: Path
) -> None:
    encoder = container.encoder()
    image = load_image(image_folder / "home" / "img4.png").image
    text, negative = encoder.encode_texts(["sunset"])[0], encoder.encode_texts(["people"])[0]
    pixels = encoder.encode_pil([image])[0]
    query = Query(
        text="sunset", image=image, text_weight=0.3, image_weight=0.7, negative="people", negative_weight=0.2
    )
    expected = normalised(0.3 * text + 0.7 * pixels - 0.2 * negative)
    np.testing.assert_allclose(query_vector(query, encoder, indexed), expected, atol=1e-5)


def test_query_by_stored_id_uses_the_stored_vector(container: Container, indexed: VectorStore) -> None:
    record = next(iter(indexed.scroll(with_vectors=True)))
    vector = query_vector(Query(image_id=record.id), container.encoder(), indexed)
    np.testing.assert_allclose(vector, record.vector, atol=1e-6)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query(), "needs text"),
        (Query(text="x", k=0), "k must be"),
        (Query(text="x", k=5000), "k must be"),
        (Query(text="x", offset=-1), "offset"),
        (Query(image_id="nope"), "no image with id"),
        (Query(text="x", rerank=True, rerank_k=0), "rerank_k"),
        (Query(text="x", rerank=True), "no generative model"),
    ],
)
def test_bad_queries_are_refused_with_a_reason(
    container: Container, indexed: VectorStore, query: Query, message: str
) -> None:
    with pytest.raises(InvalidQuery, match=message):
        search(indexed, container.encoder(), query)


class PrefersWideImages:
    """A scorer whose preference is known: wider images score higher (stands in for the generative model)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, query: str, images: Sequence[Image.Image]) -> list[float]:
        self.calls.append(len(images))
        return [image.width / 1000 + (image.getpixel((0, 0))[0] / 1e6) for image in images]


def test_rerank_orders_by_the_scorer_and_keeps_both_scores(
    container: Container, indexed: VectorStore
) -> None:
    scorer = PrefersWideImages()
    hits = search(
        indexed,
        container.encoder(),
        Query(text="x", k=8, rerank=True, rerank_k=8),
        scorer=scorer,
        load_hit_image=load_hit,
    )
    assert scorer.calls == [8]  # one batched call for all candidates
    widths = [hit.payload["width"] for hit in hits]
    assert widths == sorted(widths, reverse=True)
    assert all(hit.rerank_score is not None and hit.score is not None for hit in hits)
    rerank_scores = [hit.rerank_score for hit in hits]
    assert rerank_scores == sorted(rerank_scores, reverse=True)


def test_rerank_pages_come_from_one_reranked_list(container: Container, indexed: VectorStore) -> None:
    encoder = container.encoder()
    full = search(
        indexed,
        encoder,
        Query(text="x", k=6, rerank=True, rerank_k=6),
        scorer=PrefersWideImages(),
        load_hit_image=load_hit,
    )
    page2 = search(
        indexed,
        encoder,
        Query(text="x", k=3, offset=3, rerank=True, rerank_k=6),
        scorer=PrefersWideImages(),
        load_hit_image=load_hit,
    )
    assert [h.id for h in page2] == [h.id for h in full[3:6]]


def test_fusion_weight_one_is_the_rerank_score_and_zero_the_clip_order() -> None:
    clip, rerank = [0.9, 0.5, 0.1], [0.1, 0.2, 0.9]
    assert fuse_scores(clip, rerank, 1.0) == rerank
    zero = fuse_scores(clip, rerank, 0.0)
    assert np.argsort(zero).tolist() == np.argsort(clip).tolist()
    half = np.asarray(fuse_scores(clip, rerank, 0.5))
    z = lambda v: (np.asarray(v) - np.mean(v)) / np.std(v)  # noqa: E731
    np.testing.assert_allclose(half, 0.5 * z(rerank) + 0.5 * z(clip))
    assert fuse_scores([0.3, 0.3], [0.5, 0.5], 0.5) == [0.0, 0.0]  # constant scores carry no order
