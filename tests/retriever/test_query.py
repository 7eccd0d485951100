"""Query building and rerank wiring (random tiny weights: arithmetic and ordering, not quality)."""

from __future__ import annotations

import os
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
from retriever.query import Query, by_date, fuse_scores, query_vector, search
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
        (Query(text="x", min_relevance=0.5), "no generative model"),
        (Query(text="x", min_relevance=1.5), "min_relevance must be between 0 and 1"),
        (Query(text="x", min_relevance=float("nan")), "min_relevance must be between 0 and 1"),
        (Query(image_id="x", min_relevance=0.5), "min_relevance needs query text"),
        (Query(text="x", sort="size"), "sort must be one of"),  # type: ignore[arg-type]
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


class Relevance:
    """A stand-in for the generative model's P("Yes") at the Scorer protocol (wide images 0.16, narrow 0.096),
    so that which hits min_relevance drops is known; ordering and dropping are what is tested, not the model."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, query: str, images: Sequence[Image.Image]) -> list[float]:
        self.calls.append(len(images))
        return [image.width / 1000 for image in images]


def test_min_relevance_drops_low_p_yes_and_reuses_vqa_rerank_scores(container: Container, indexed: VectorStore) -> None:
    encoder, relevance = container.encoder(), Relevance()
    query = Query(text="x", k=8, rerank_k=8, min_relevance=0.12)
    hits = search(
        indexed, encoder, query, scorer=PrefersWideImages(), relevance_scorer=relevance, load_hit_image=load_hit
    )
    assert relevance.calls == [8]  # another scorer: one more batched call over the rerank_k candidates
    assert len(hits) == 4 and all(hit.payload["width"] == 160 and hit.relevance == pytest.approx(0.16) for hit in hits)
    same = search(indexed, encoder, query, scorer=relevance, relevance_scorer=relevance, load_hit_image=load_hit)
    assert relevance.calls == [8, 8]  # the rerank scores are P("Yes") already: reused, not scored again
    assert {hit.id for hit in same} == {hit.id for hit in hits}


def test_sort_by_date_orders_what_passed_newest_first(container: Container, image_folder: Path) -> None:
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    for i, path in enumerate(files):  # PNGs and JPEGs without EXIF: `taken` is the mtime
        os.utime(path, (1_600_000_000 + 86_400 * ((i * 5) % 8), 1_600_000_000 + 86_400 * ((i * 5) % 8)))
    encoder = container.encoder()
    store = container.create_or_open_store("dated", encoder)
    index_images(iter_sources([image_folder]), encoder, store, batch_size=4, workers=2)
    hits = search(store, encoder, Query(text="x", k=8, rerank_k=8, min_relevance=0.12, sort="date"),
                  scorer=Relevance(), relevance_scorer=Relevance(), load_hit_image=load_hit)
    assert len(hits) == 4 and all(hit.payload["width"] == 160 for hit in hits)
    taken = [hit.payload["taken"] for hit in hits]
    assert taken == sorted(taken, reverse=True) and len(set(taken)) == 4
    everything = search(store, encoder, Query(text="x", k=8, sort="date"))
    assert [hit.payload["taken"] for hit in everything] == sorted((f"2020-09-{13 + d:02d}T12:26:40" for d in range(8)),
                                                                  reverse=True)
    page = search(store, encoder, Query(text="x", k=3, offset=3, sort="date"))
    assert [hit.id for hit in page] == [hit.id for hit in everything[3:6]]


def test_date_order_keeps_the_relevance_order_of_ties_and_puts_images_without_taken_last() -> None:
    taken = ["2021-01-01T00:00:00", None, "2022-05-05T10:00:00", "2021-01-01T00:00:00", "absent", "2023-01-01T00:00:00"]
    hits = [Hit(id=f"h{i}", score=1.0 - i / 10, payload={"taken": value}) for i, value in enumerate(taken)]
    hits[4].payload.pop("taken")
    assert [hit.id for hit in by_date(hits)] == ["h5", "h2", "h0", "h3", "h1", "h4"]
