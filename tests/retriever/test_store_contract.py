"""The VectorStore contract, run against every backend in conftest.BACKENDS through the `store` fixture."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from bench.synthetic_vectors import isotropic
from retriever.errors import CollectionNotFound, EncoderMismatch, InvalidQuery, PointNotFound
from retriever.store import Filter, Hit, Payload, PayloadUpdate, VectorStore
from tests.retriever.conftest import CONTRACT_DIM, Collection

TAGS = ("cat", "dog", "outdoor", "night", "sofa", "red")


@dataclass
class Points:
    """A batch of points and what a store must answer about them."""

    ids: list[str]
    vectors: np.ndarray
    payloads: list[Payload]

    def vector_of(self, point_id: str) -> np.ndarray:
        return self.vectors[self.ids.index(point_id)]


def point_id(i: int) -> str:
    # content-hash-like ids, so id order differs from insertion order
    return hashlib.sha1(f"image-{i}".encode()).hexdigest()[:16]


def make_points(n: int, dim: int = CONTRACT_DIM, seed: int = 0, start: int = 0) -> Points:
    """n points with varied payloads: one or two paths, some tags, and sizes that are sometimes missing."""
    rng = np.random.default_rng(seed)
    payloads: list[Payload] = []
    for i in range(start, start + n):
        folder = ("cats", "dogs", "misc")[int(rng.integers(3))]
        payload: Payload = {"paths": [f"/photos/{folder}/{i}.jpg"]}
        if rng.random() < 0.3:
            payload["paths"].append(f"/archive/{folder}/{i}.jpg")
        if rng.random() < 0.85:
            payload["tags"] = sorted(
                {TAGS[int(t)] for t in rng.integers(len(TAGS), size=int(rng.integers(4)))}
            )
        for key, high in (("width", 2000), ("height", 1500), ("bytes", 4_000_000)):
            draw = rng.random()
            if draw < 0.8:
                payload[key] = int(rng.integers(1, high))
            elif draw < 0.9:
                payload[key] = None
        if i % 10 == 1:
            payload["taken"] = None
        elif i % 10 != 0:  # every tenth has no `taken` at all
            payload["taken"] = f"{2010 + i % 12}-{1 + i * 7 % 12:02d}-{1 + i * 3 % 28:02d}T{i % 24:02d}:{i % 60:02d}:00"
        payloads.append(payload)
    ids = [point_id(i) for i in range(start, start + n)]
    return Points(ids, isotropic(n, dim, seed=seed + 1000), payloads)


FILTERS = {
    "path_prefix": Filter(path_prefix="/photos/cats/"),
    "second_path_prefix": Filter(path_prefix="/archive/"),
    "empty_path_prefix": Filter(path_prefix=""),
    "tags_any": Filter(tags_any=("cat", "night")),
    "tags_all": Filter(tags_all=("cat", "outdoor")),
    "tags_all_repeated": Filter(tags_all=("dog", "dog")),
    "min_width": Filter(min_width=800),
    "max_width": Filter(max_width=800),
    "min_height": Filter(min_height=700),
    "max_height": Filter(max_height=700),
    "min_bytes": Filter(min_bytes=1_000_000),
    "max_bytes": Filter(max_bytes=1_000_000),
    "combined": Filter(path_prefix="/photos/", tags_any=("dog", "red"), min_width=300, max_height=1200),
    "matches_nothing": Filter(tags_any=("unicorn",)),
    "taken_after": Filter(taken_after="2016-01-01"),
    "taken_before": Filter(taken_before="2014-06-30T12:00:00"),
    "taken_between": Filter(taken_after="2013-01-01", taken_before="2018-12-31T23:59:59"),
    "taken_after_aware": Filter(taken_after="2016-01-01T02:00:00+02:00"),  # 2016-01-01T00:00:00 in UTC
    "taken_with_tags": Filter(tags_any=("cat",), taken_before="2015-01-01"),
}


def expected_ranking(
    points: Points, query: np.ndarray, filter: Filter | None = None
) -> list[tuple[str, float]]:
    """Brute force: (id, inner product) of every matching point by descending score, ties by id."""
    scores = points.vectors.astype(np.float64) @ query.astype(np.float64)
    ranked = [
        (pid, float(score))
        for pid, score, payload in zip(points.ids, scores, points.payloads, strict=True)
        if filter is None or filter.matches(payload)
    ]
    return sorted(ranked, key=lambda hit: (-hit[1], hit[0]))


def assert_same_ranking(
    hits: Sequence[Hit], expected: Sequence[tuple[str, float]], tol: float = 1e-5
) -> None:
    """Hits equal the expected (id, score) list; float noise may only swap ids whose scores are within tol."""
    assert len(hits) == len(expected)
    true_score = dict(expected)
    for hit, (expected_id, expected_score) in zip(hits, expected, strict=True):
        assert hit.score == pytest.approx(expected_score, abs=tol)
        if hit.id != expected_id:
            assert hit.id in true_score and abs(true_score[hit.id] - expected_score) < tol


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


@pytest.fixture
def points() -> Points:
    return make_points(240)


@pytest.fixture
def filled(store: VectorStore, points: Points) -> VectorStore:
    store.upsert(points.ids, points.vectors, points.payloads)
    return store


# --- collections -------------------------------------------------------------------------------------------


def test_store_satisfies_the_protocol(store: VectorStore, collection: Collection) -> None:
    assert isinstance(store, VectorStore)
    assert store.name == collection.directory.name
    assert store.manifest == collection.manifest()


def test_opening_a_missing_collection_without_manifest_names_it(collection: Collection) -> None:
    with pytest.raises(CollectionNotFound, match=collection.directory.name):
        collection.open(None)


@pytest.mark.parametrize(
    "change",
    [{"encoder": "ViT-B-32"}, {"weights": "sha256:abc"}, {"dim": 32}],
    ids=["encoder", "weights", "dim"],
)
def test_reopening_with_another_encoder_is_refused(
    store: VectorStore, collection: Collection, change: dict[str, object]
) -> None:
    collection.close(store)
    with pytest.raises(EncoderMismatch):
        collection.open(collection.manifest(**change))


def test_search_of_an_empty_collection_returns_nothing(store: VectorStore) -> None:
    assert store.search(unit(np.ones(CONTRACT_DIM)), k=5) == []
    assert store.count() == 0
    assert list(store.scroll()) == []


# --- writes ------------------------------------------------------------------------------------------------


def test_upserting_the_same_points_twice_keeps_one_copy_each(filled: VectorStore, points: Points) -> None:
    filled.upsert(points.ids, points.vectors, points.payloads)
    assert filled.count() == len(points.ids)
    hits = filled.search(points.vectors[0], k=3)
    assert [hit.id for hit in hits].count(points.ids[0]) == 1


def test_upsert_overwrites_the_vector_and_payload_of_an_existing_id(
    filled: VectorStore, points: Points
) -> None:
    target = points.ids[5]
    new_vector = unit(-points.vector_of(target))
    filled.upsert([target], new_vector[None, :], [{"paths": ["/new.jpg"], "tags": ["new"]}])

    assert filled.count() == len(points.ids)
    [record] = filled.get([target], with_vectors=True)
    assert record.payload == {"paths": ["/new.jpg"], "tags": ["new"]}
    assert record.vector is not None and np.allclose(record.vector, new_vector)
    assert filled.search(new_vector, k=1)[0].id == target
    assert filled.search(new_vector, k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert target not in [hit.id for hit in filled.search(points.vector_of(target), k=5)]
    assert filled.count(Filter(tags_any=("new",))) == 1


def test_delete_removes_points_and_counts_only_those_that_existed(
    filled: VectorStore, points: Points
) -> None:
    gone = points.ids[:3]
    assert filled.delete([*gone, "no-such-id"]) == 3
    assert filled.delete(gone) == 0
    assert filled.count() == len(points.ids) - 3
    assert filled.get(gone) == []
    for i in range(3):
        assert set(gone).isdisjoint(hit.id for hit in filled.search(points.vectors[i], k=10))
    assert set(gone).isdisjoint(record.id for record in filled.scroll())


def test_set_payload_replaces_the_payload_and_keeps_the_vector(filled: VectorStore, points: Points) -> None:
    target = points.ids[7]
    filled.set_payload(target, {"paths": ["/moved.jpg"], "tags": ["sofa"], "captions": {"tiny": "a sofa"}})
    [record] = filled.get([target], with_vectors=True)
    assert record.payload["captions"] == {"tiny": "a sofa"}
    assert record.vector is not None and np.allclose(record.vector, points.vector_of(target))
    assert filled.search(points.vector_of(target), k=1)[0].payload["paths"] == ["/moved.jpg"]
    with pytest.raises(PointNotFound, match="no-such-id"):
        filled.set_payload("no-such-id", {})
    assert filled.get(["no-such-id"]) == []


def test_vectors_of_another_dimension_are_refused_naming_both_dims(store: VectorStore) -> None:
    with pytest.raises(EncoderMismatch, match=rf"\b{CONTRACT_DIM}\b") as refused:
        store.upsert(["a"], np.ones((1, CONTRACT_DIM + 1), dtype=np.float32), [{}])
    assert str(CONTRACT_DIM + 1) in str(refused.value)
    with pytest.raises((EncoderMismatch, InvalidQuery), match=rf"\b{CONTRACT_DIM + 1}\b"):
        store.search(np.ones(CONTRACT_DIM + 1, dtype=np.float32), k=3)
    assert store.count() == 0


# --- reads -------------------------------------------------------------------------------------------------


def test_get_returns_existing_points_in_the_order_asked(filled: VectorStore, points: Points) -> None:
    asked = [points.ids[9], "missing", points.ids[2], points.ids[40]]
    records = filled.get(asked)
    assert [record.id for record in records] == [points.ids[9], points.ids[2], points.ids[40]]
    assert records[1].payload == points.payloads[2]
    assert all(record.vector is None for record in records)
    with_vectors = filled.get(asked, with_vectors=True)
    for record in with_vectors:
        assert record.vector is not None and np.allclose(record.vector, points.vector_of(record.id))


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_count_with_each_filter_equals_filter_matches(filled: VectorStore, points: Points, name: str) -> None:
    filter = FILTERS[name]
    assert filled.count(filter) == sum(filter.matches(payload) for payload in points.payloads)


def test_filters_under_test_are_neither_trivial_nor_empty(points: Points) -> None:
    for name, filter in FILTERS.items():
        matched = sum(filter.matches(payload) for payload in points.payloads)
        assert (matched == 0) == (name == "matches_nothing"), name
        assert matched < len(points.payloads) or name == "empty_path_prefix", name


def test_taken_bounds_are_inclusive_and_images_without_taken_never_match(store: VectorStore) -> None:
    taken = [
        "2020-01-01T00:00:00", "2020-06-15T08:30:00", "2020-06-15T08:30:01", "2021-01-01T00:00:00", None, "absent",
    ]
    payloads: list[Payload] = [{"paths": [f"/t/{i}.jpg"], "taken": value} for i, value in enumerate(taken)]
    payloads[-1].pop("taken")
    ids = [point_id(1000 + i) for i in range(len(taken))]
    store.upsert(ids, isotropic(len(taken), CONTRACT_DIM, seed=5), payloads)

    def found(filter: Filter) -> set[int]:
        hits = store.search(unit(np.ones(CONTRACT_DIM)), 10, filter)
        assert {hit.id for hit in hits} == {record.id for record in store.scroll(filter)}
        return {ids.index(hit.id) for hit in hits}

    assert found(Filter(taken_after="2020-06-15T08:30:00")) == {1, 2, 3}
    assert found(Filter(taken_before="2020-06-15T08:30:00")) == {0, 1}
    assert found(Filter(taken_after="2020-01-01", taken_before="2021-01-01")) == {0, 1, 2, 3}  # a date is midnight
    assert found(Filter(taken_before="2020-06-15T10:30:00+02:00")) == {0, 1}  # aware: compared in UTC
    assert store.count(Filter(taken_after="1900-01-01")) == 4
    with pytest.raises(InvalidQuery):
        Filter(taken_after="last tuesday")


@pytest.mark.parametrize("name", ["none", *sorted(FILTERS)])
def test_scroll_returns_every_match_once_in_id_order(filled: VectorStore, points: Points, name: str) -> None:
    filter = FILTERS.get(name)
    records = list(filled.scroll(filter, batch_size=7))
    expected = sorted(
        pid for pid, p in zip(points.ids, points.payloads, strict=True) if not filter or filter.matches(p)
    )
    assert [record.id for record in records] == expected
    assert all(record.payload == points.payloads[points.ids.index(record.id)] for record in records)


def test_scroll_with_vectors_returns_the_stored_vectors(filled: VectorStore, points: Points) -> None:
    records = list(filled.scroll(batch_size=50, with_vectors=True))
    assert len(records) == len(points.ids)
    for record in records:
        assert record.vector is not None and np.allclose(record.vector, points.vector_of(record.id))


# --- search ------------------------------------------------------------------------------------------------


def test_search_ranks_by_inner_product_like_brute_force(filled: VectorStore, points: Points) -> None:
    for query in isotropic(5, CONTRACT_DIM, seed=7):
        assert_same_ranking(filled.search(query, k=15), expected_ranking(points, query)[:15])


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_search_with_each_filter_ranks_only_matches(filled: VectorStore, points: Points, name: str) -> None:
    filter = FILTERS[name]
    for query in isotropic(3, CONTRACT_DIM, seed=8):
        hits = filled.search(query, k=12, filter=filter)
        assert all(filter.matches(hit.payload) for hit in hits)
        assert_same_ranking(hits, expected_ranking(points, query, filter)[:12])


@pytest.mark.parametrize("filter", [None, FILTERS["tags_any"]], ids=["no_filter", "tags_any"])
def test_pages_concatenated_equal_one_big_search(filled: VectorStore, filter: Filter | None) -> None:
    query = isotropic(1, CONTRACT_DIM, seed=9)[0]
    pages = [filled.search(query, k=7, filter=filter, offset=7 * page) for page in range(6)]
    big = filled.search(query, k=42, filter=filter)
    assert [hit.id for page in pages for hit in page] == [hit.id for hit in big]
    assert filled.search(query, k=7, filter=filter, offset=7) == pages[1]  # the same page twice is the same


def test_ties_are_broken_by_id_also_across_pages(store: VectorStore) -> None:
    query, tied = isotropic(2, CONTRACT_DIM, seed=12)
    tied_ids = [point_id(i) for i in range(10)]
    store.upsert(tied_ids, np.tile(tied, (10, 1)), [{} for _ in tied_ids])
    # the better and worse points bracket the tied score, so the tie sits inside the ranking
    tied_score = float(tied @ query)
    store.upsert(["zz-better", "00-worse"], np.stack([unit(query + tied), unit(tied - 2 * query)]), [{}, {}])
    assert float(unit(query + tied) @ query) > tied_score > float(unit(tied - 2 * query) @ query)
    pages = [store.search(query, k=4, offset=4 * page) for page in range(3)]
    assert [hit.id for page in pages for hit in page] == ["zz-better", *sorted(tied_ids), "00-worse"]


def test_min_score_drops_hits_below_it(filled: VectorStore, points: Points) -> None:
    query = isotropic(1, CONTRACT_DIM, seed=10)[0]
    unbounded = filled.search(query, k=30)
    threshold = unbounded[12].score
    bounded = filled.search(query, k=30, min_score=threshold)
    assert bounded == [hit for hit in unbounded if hit.score >= threshold]
    assert 12 < len(bounded) < 30
    assert filled.search(query, k=5, min_score=1.01) == []


def test_search_hits_carry_payloads(filled: VectorStore, points: Points) -> None:
    [hit] = filled.search(points.vectors[3], k=1)
    assert hit.id == points.ids[3]
    assert hit.payload == points.payloads[3]
    assert hit.path == points.payloads[3]["paths"][0]


def test_invalid_k_and_offset_are_refused(filled: VectorStore) -> None:
    query = isotropic(1, CONTRACT_DIM)[0]
    with pytest.raises(InvalidQuery, match="k"):
        filled.search(query, k=0)
    with pytest.raises(InvalidQuery, match="offset"):
        filled.search(query, k=3, offset=-1)


# --- persistence -------------------------------------------------------------------------------------------


def test_points_survive_close_and_reopen(
    filled: VectorStore, points: Points, reopen: Callable[..., VectorStore], collection: Collection
) -> None:
    filled.delete(points.ids[:4])
    filled.set_payload(points.ids[4], {"paths": ["/kept.jpg"]})
    query = isotropic(1, CONTRACT_DIM, seed=11)[0]
    before = filled.search(query, k=20, filter=FILTERS["tags_any"])

    again = reopen(filled)
    assert again.manifest == collection.manifest()
    assert again.count() == len(points.ids) - 4
    assert again.get([points.ids[4]])[0].payload == {"paths": ["/kept.jpg"]}
    assert again.get(points.ids[:4]) == []
    assert again.search(query, k=20, filter=FILTERS["tags_any"]) == before


def test_save_reports_completion_as_a_bool(filled: VectorStore) -> None:
    assert isinstance(filled.save(), bool)


def test_writes_after_a_save_survive_reopen(
    filled: VectorStore, points: Points, reopen: Callable[..., VectorStore], collection: Collection
) -> None:
    filled.save()
    more = make_points(30, seed=1, start=10_000)
    filled.upsert(more.ids, more.vectors, more.payloads)
    filled.delete(points.ids[:2])
    again = reopen(filled, collection.manifest())
    assert again.count() == len(points.ids) + 30 - 2
    assert again.search(more.vectors[0], k=1)[0].id == more.ids[0]
    assert again.get(points.ids[:2]) == []


# --- keyword search ----------------------------------------------------------------------------------------

CAPTION_WORDS = ("a", "red", "sofa", "cat", "sleeping", "on", "the", "beach", "at", "night", "dog", "window")


def reference_words(payload: Payload) -> list[str]:
    """The words a payload is searchable by, spelled out independently of retriever/keywords.py."""
    texts = [*payload.get("paths", []), *payload.get("tags", []), *payload.get("captions", {}).values()]
    return [word.lower() for text in texts for word in re.findall(r"[^\W_]+", text)]


def reference_bm25(points: Points, text: str, filter: Filter | None = None) -> list[tuple[str, float]]:
    """BM25 (k1 1.2, b 0.75, idf ln(1 + (N - df + .5) / (df + .5)) over every point with words), by score then id."""
    corpus = {pid: words for pid, p in zip(points.ids, points.payloads, strict=True) if (words := reference_words(p))}
    average = sum(map(len, corpus.values())) / len(corpus)
    terms = {word.lower() for word in re.findall(r"[^\W_]+", text)}
    ranked = []
    for pid, words in corpus.items():
        payload = points.payloads[points.ids.index(pid)]
        if filter is not None and not filter.matches(payload):
            continue
        score = 0.0
        for term in terms:
            df = sum(term in other for other in corpus.values())
            tf = words.count(term)
            if tf:
                idf = math.log((len(corpus) - df + 0.5) / (df + 0.5) + 1)
                score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(words) / average))
        if score > 0:
            ranked.append((pid, score))
    return sorted(ranked, key=lambda hit: (-hit[1], hit[0]))


@pytest.fixture
def worded() -> Points:
    """Points whose words vary: paths and tags as in make_points, and captions of 0 to 9 words on two in three."""
    points = make_points(240, seed=3)
    rng = np.random.default_rng(4)
    for payload in points.payloads[::3] + points.payloads[1::3]:
        words = rng.choice(CAPTION_WORDS, size=int(rng.integers(0, 10)))
        payload["captions"] = {"tiny-vlm": " ".join(words)}
    return points


@pytest.fixture
def worded_store(store: VectorStore, worded: Points) -> VectorStore:
    store.upsert(worded.ids, worded.vectors, worded.payloads)
    return store


KEYWORD_QUERIES = ["cat", "red sofa", "Night dog window", "archive 17", "sofa sofa", "misc beach outdoor"]


@pytest.mark.parametrize("text", KEYWORD_QUERIES)
def test_keyword_search_ranks_like_bm25_over_paths_tags_and_captions(
    worded_store: VectorStore, worded: Points, text: str
) -> None:
    expected = reference_bm25(worded, text)
    assert len(expected) > 20  # every query matches many points, with scores that differ
    assert_same_ranking(worded_store.keyword_search(text, k=20), expected[:20], tol=1e-4)


@pytest.mark.parametrize("name", ["path_prefix", "tags_all", "min_width", "combined", "matches_nothing"])
def test_keyword_search_with_a_filter_ranks_only_matches(worded_store: VectorStore, worded: Points, name: str) -> None:
    filter = FILTERS[name]
    hits = worded_store.keyword_search("red cat night", k=15, filter=filter)
    assert all(filter.matches(hit.payload) for hit in hits)
    assert_same_ranking(hits, reference_bm25(worded, "red cat night", filter)[:15], tol=1e-4)


def test_keyword_search_finds_words_inside_file_and_folder_names(store: VectorStore) -> None:
    vectors = isotropic(4, CONTRACT_DIM, seed=20)
    store.upsert(
        ["lisbon", "porto", "home", "words"],
        vectors,
        [
            {"paths": ["/photos/2019_Lisbon-trip/IMG_001.jpg"]},
            {"paths": ["/photos/porto/DSC0042.JPG"], "tags": ["lisbonesque"]},
            {"paths": ["/photos/home/sofa.png"]},
            {"paths": ["/photos/Not Near/or.png"]},
        ],
    )
    assert [hit.id for hit in store.keyword_search('NOT "or" near*', k=5)] == ["words"]  # words, not operators
    for text in ("lisbon", "LISBON", "trip 2019", "img_001", "IMG 001"):
        assert [hit.id for hit in store.keyword_search(text, k=5)] == ["lisbon"], text
    assert [hit.id for hit in store.keyword_search("dsc0042 jpg", k=5)] == ["porto", "lisbon"]
    assert store.keyword_search("lisb", k=5) == []  # whole words only
    assert store.keyword_search("?!", k=5) == []  # no words, no hits


def test_keyword_search_follows_payload_changes(worded_store: VectorStore, worded: Points) -> None:
    target, other = worded.ids[0], worded.ids[1]
    new_payload = {"paths": ["/x.jpg"], "captions": {"tiny-vlm": "a zebra crossing"}}
    worded_store.set_payload(target, new_payload)
    assert [hit.id for hit in worded_store.keyword_search("zebra", k=5)] == [target]
    old_words = set(reference_words(worded.payloads[0])) - set(reference_words(new_payload))
    assert old_words
    hits = {hit.id for word in old_words for hit in worded_store.keyword_search(word, k=240)}
    assert target not in hits
    worded_store.upsert([other], worded.vectors[1:2], [{"paths": ["/y.jpg"], "tags": ["zebra"]}])
    assert {hit.id for hit in worded_store.keyword_search("zebra", k=5)} == {target, other}
    worded_store.delete([target])
    assert [hit.id for hit in worded_store.keyword_search("zebra crossing", k=5)] == [other]


def test_keyword_pages_concatenated_equal_one_big_search(worded_store: VectorStore) -> None:
    pages = [worded_store.keyword_search("cat night", k=7, offset=7 * page) for page in range(6)]
    big = worded_store.keyword_search("cat night", k=42)
    assert len(big) == 42
    assert [hit.id for page in pages for hit in page] == [hit.id for hit in big]


def test_keyword_ties_are_broken_by_id_also_across_pages(store: VectorStore) -> None:
    tied_ids = [point_id(i) for i in range(10)]
    payloads = [{"paths": ["/same/name.jpg"], "tags": ["beach"]} for _ in tied_ids]
    store.upsert(tied_ids, isotropic(10, CONTRACT_DIM, seed=21), payloads)
    store.upsert(
        ["zz-better", "00-worse"],
        isotropic(2, CONTRACT_DIM, seed=22),
        [{"paths": ["/beach/beach.jpg"], "tags": ["beach"]}, {"paths": ["/beach/other/place/name.jpg"]}],
    )
    pages = [store.keyword_search("beach", k=4, offset=4 * page) for page in range(3)]
    assert [hit.id for page in pages for hit in page] == ["zz-better", *sorted(tied_ids), "00-worse"]


def test_keyword_search_hits_carry_payloads_and_survive_reopen(
    worded_store: VectorStore, worded: Points, reopen: Callable[..., VectorStore]
) -> None:
    before = worded_store.keyword_search("sofa beach", k=10)
    assert all(hit.payload == worded.payloads[worded.ids.index(hit.id)] for hit in before)
    assert reopen(worded_store).keyword_search("sofa beach", k=10) == before


def test_invalid_keyword_k_and_offset_are_refused(worded_store: VectorStore) -> None:
    with pytest.raises(InvalidQuery, match="k"):
        worded_store.keyword_search("cat", k=0)
    with pytest.raises(InvalidQuery, match="offset"):
        worded_store.keyword_search("cat", k=3, offset=-1)


# --- payload updates ---------------------------------------------------------------------------------------

PHOTOS: dict[str, Payload] = {
    "cat-1": {
        "paths": ["/photos/cats/1.jpg"],
        "tags": ["cat", "sofa"],
        "width": 640,
        "height": 480,
        "captions": {"tiny-vlm": "a cat on a sofa"},
    },
    "dog-2": {"paths": ["/photos/dogs/2.jpg", "/archive/dogs/2.jpg"], "tags": ["dog"], "width": 800},
    "bare-3": {"paths": ["/photos/misc/3.jpg"]},
}


@pytest.fixture
def photos(store: VectorStore) -> VectorStore:
    """Three points with known payloads: one with tags and a caption, one with two paths, one with a path only."""
    ids = list(PHOTOS)
    store.upsert(ids, isotropic(len(ids), CONTRACT_DIM, seed=30), [PHOTOS[i] for i in ids])
    return store


def stored_payload(store: VectorStore, point: str) -> Payload:
    [record] = store.get([point])
    return record.payload


def other_handle(store: VectorStore, collection: Collection) -> VectorStore:
    """A second store object on the same collection; embedded Qdrant admits one client at a time, so it reuses store."""
    return store if collection.backend == "qdrant" else collection.open(None)


def test_update_setting_fields_keeps_the_other_fields(photos: VectorStore) -> None:
    result = photos.update_payloads({"cat-1": PayloadUpdate(set={"width": 1024, "format": "JPEG"})})
    expected = {**PHOTOS["cat-1"], "width": 1024, "format": "JPEG"}
    assert result == {"cat-1": expected}
    assert stored_payload(photos, "cat-1") == expected
    assert stored_payload(photos, "dog-2") == PHOTOS["dog-2"]


def test_update_adds_only_new_values_to_list_fields_in_the_order_given(photos: VectorStore) -> None:
    update = PayloadUpdate(
        add={"paths": ("/archive/cats/1.jpg", "/photos/cats/1.jpg", "/b.jpg"), "tags": ("red", "cat")}
    )
    result = photos.update_payloads({"cat-1": update, "bare-3": PayloadUpdate(add={"tags": ("night", "red", "night")})})
    assert result["cat-1"]["paths"] == ["/photos/cats/1.jpg", "/archive/cats/1.jpg", "/b.jpg"]
    assert result["cat-1"]["tags"] == ["cat", "sofa", "red"]
    assert result["bare-3"] == {"paths": ["/photos/misc/3.jpg"], "tags": ["night", "red"]}  # a missing list is made
    assert stored_payload(photos, "cat-1") == result["cat-1"]
    assert stored_payload(photos, "bare-3") == result["bare-3"]


def test_update_removes_values_from_list_fields(photos: VectorStore) -> None:
    result = photos.update_payloads(
        {
            "dog-2": PayloadUpdate(remove={"paths": ("/photos/dogs/2.jpg", "/never.jpg"), "tags": ("dog",)}),
            "bare-3": PayloadUpdate(remove={"tags": ("cat",)}),  # nothing to remove from: the field stays absent
        }
    )
    assert result["dog-2"] == {"paths": ["/archive/dogs/2.jpg"], "tags": [], "width": 800}
    assert result["bare-3"] == PHOTOS["bare-3"]
    assert stored_payload(photos, "dog-2") == result["dog-2"]


def test_removing_and_adding_one_value_in_one_update_keeps_it_once_at_the_end(photos: VectorStore) -> None:
    update = PayloadUpdate(remove={"tags": ("cat",)}, add={"tags": ("cat", "red")})
    assert photos.update_payloads({"cat-1": update})["cat-1"]["tags"] == ["sofa", "cat", "red"]


def test_update_of_one_caption_keeps_the_captions_of_other_models(photos: VectorStore) -> None:
    result = photos.update_payloads(
        {
            "cat-1": PayloadUpdate(captions={"deepseek-vl-1.3b": "a cat sleeping on a red sofa"}),
            "bare-3": PayloadUpdate(captions={"hf-hub:org/model.v2": "a window"}),  # dots and slashes in the model
        }
    )
    assert result["cat-1"]["captions"] == {
        "tiny-vlm": "a cat on a sofa",
        "deepseek-vl-1.3b": "a cat sleeping on a red sofa",
    }
    assert result["bare-3"]["captions"] == {"hf-hub:org/model.v2": "a window"}
    again = photos.update_payloads({"cat-1": PayloadUpdate(captions={"tiny-vlm": "a tabby cat"})})
    assert again["cat-1"]["captions"] == {"tiny-vlm": "a tabby cat", "deepseek-vl-1.3b": "a cat sleeping on a red sofa"}
    assert stored_payload(photos, "cat-1")["captions"] == again["cat-1"]["captions"]
    assert {k: v for k, v in again["cat-1"].items() if k != "captions"} == {
        k: v for k, v in PHOTOS["cat-1"].items() if k != "captions"
    }


def test_update_setting_a_field_to_none_removes_it(photos: VectorStore) -> None:
    result = photos.update_payloads({"cat-1": PayloadUpdate(set={"width": None, "captions": None, "absent": None})})
    expected = {k: v for k, v in PHOTOS["cat-1"].items() if k not in ("width", "captions")}
    assert result == {"cat-1": expected}
    assert stored_payload(photos, "cat-1") == expected


def test_update_leaves_out_ids_that_do_not_exist_and_creates_nothing(photos: VectorStore) -> None:
    result = photos.update_payloads(
        {"no-such-id": PayloadUpdate(set={"width": 1}), "dog-2": PayloadUpdate(add={"tags": ("red",)})}
    )
    assert list(result) == ["dog-2"]
    assert photos.get(["no-such-id"]) == []
    assert photos.count() == len(PHOTOS)
    assert photos.update_payloads({}) == {}


def test_an_empty_update_changes_nothing_and_returns_the_payload(photos: VectorStore) -> None:
    assert photos.update_payloads({"cat-1": PayloadUpdate(), "dog-2": PayloadUpdate(add={"tags": ()})}) == {
        "cat-1": PHOTOS["cat-1"],
        "dog-2": PHOTOS["dog-2"],
    }
    assert [record.payload for record in photos.scroll()] == [PHOTOS[i] for i in sorted(PHOTOS)]


def random_update(rng: np.random.Generator, i: int) -> PayloadUpdate:
    """A mix of every kind of change, drawn so that fields set and fields changed never coincide."""
    set_: dict[str, object] = {}
    if rng.random() < 0.5:
        set_["width"] = None if rng.random() < 0.3 else int(rng.integers(1, 3000))
    if rng.random() < 0.3:
        set_["format"] = "PNG"
    add: dict[str, tuple[str, ...]] = {}
    remove: dict[str, tuple[str, ...]] = {}
    if rng.random() < 0.6:
        add["tags"] = tuple(TAGS[int(t)] for t in rng.integers(len(TAGS), size=int(rng.integers(1, 4))))
    if rng.random() < 0.4:
        remove["tags"] = tuple(TAGS[int(t)] for t in rng.integers(len(TAGS), size=2))
    if rng.random() < 0.4:
        add["paths"] = (f"/copies/{i}.jpg",)
    captions = {"tiny-vlm": f"caption {i}"} if rng.random() < 0.5 else {}
    return PayloadUpdate(set=set_, add=add, remove=remove, captions=captions)


def test_updates_give_what_the_reference_semantics_give(filled: VectorStore, points: Points) -> None:
    rng = np.random.default_rng(31)
    chosen = [int(i) for i in rng.choice(len(points.ids), size=60, replace=False)]
    updates = {points.ids[i]: random_update(rng, i) for i in chosen}
    result = filled.update_payloads(updates)
    expected = {points.ids[i]: updates[points.ids[i]].apply(points.payloads[i]) for i in chosen}
    assert result == expected
    assert {record.id: record.payload for record in filled.get(list(updates))} == expected
    for i, point in enumerate(points.ids):
        if point not in updates:
            assert stored_payload(filled, point) == points.payloads[i]


def test_updates_are_seen_by_search_and_filters(photos: VectorStore) -> None:
    photos.update_payloads(
        {
            "bare-3": PayloadUpdate(add={"tags": ("unicorn",), "paths": ("/holidays/3.jpg",)}),
            "cat-1": PayloadUpdate(remove={"tags": ("sofa",)}),
        }
    )
    query = isotropic(len(PHOTOS), CONTRACT_DIM, seed=30)[2]
    assert [hit.id for hit in photos.search(query, k=3, filter=Filter(tags_any=("unicorn",)))] == ["bare-3"]
    assert [hit.id for hit in photos.search(query, k=3, filter=Filter(path_prefix="/holidays/"))] == ["bare-3"]
    assert photos.count(Filter(tags_all=("unicorn",))) == 1
    assert photos.count(Filter(tags_any=("sofa",))) == 0
    assert [record.id for record in photos.scroll(Filter(path_prefix="/holidays/"))] == ["bare-3"]
    [hit] = photos.search(query, k=1)
    assert hit.id == "bare-3" and hit.payload["tags"] == ["unicorn"]


def test_updates_are_seen_by_keyword_search(photos: VectorStore) -> None:
    assert photos.keyword_search("zebra", k=5) == []
    photos.update_payloads(
        {
            "bare-3": PayloadUpdate(add={"tags": ("zebra",)}),
            "dog-2": PayloadUpdate(captions={"tiny-vlm": "a giraffe at the window"}),
            "cat-1": PayloadUpdate(remove={"paths": ("/photos/cats/1.jpg",)}, add={"paths": ("/lisbon/1.jpg",)}),
        }
    )
    assert [hit.id for hit in photos.keyword_search("zebra", k=5)] == ["bare-3"]
    assert [hit.id for hit in photos.keyword_search("giraffe", k=5)] == ["dog-2"]
    assert [hit.id for hit in photos.keyword_search("lisbon", k=5)] == ["cat-1"]
    assert photos.keyword_search("cats", k=5) == []  # the folder of the removed path
    photos.update_payloads({"dog-2": PayloadUpdate(set={"captions": None})})
    assert photos.keyword_search("giraffe", k=5) == []


def test_ids_by_path_finds_stored_paths_and_follows_updates(photos: VectorStore) -> None:
    assert photos.ids_by_path(["/archive/dogs/2.jpg", "/nowhere.jpg", "/photos/cats/1.jpg"]) == {
        "/archive/dogs/2.jpg": "dog-2",
        "/photos/cats/1.jpg": "cat-1",
    }
    assert photos.ids_by_path([]) == {}
    assert photos.ids_by_path(["/photos/cats"]) == {}  # whole paths, not prefixes
    photos.update_payloads(
        {
            "bare-3": PayloadUpdate(add={"paths": ("/new/3.jpg",)}),
            "dog-2": PayloadUpdate(remove={"paths": ("/archive/dogs/2.jpg",)}),
        }
    )
    assert photos.ids_by_path(["/new/3.jpg", "/photos/misc/3.jpg", "/archive/dogs/2.jpg", "/photos/dogs/2.jpg"]) == {
        "/new/3.jpg": "bare-3",
        "/photos/misc/3.jpg": "bare-3",
        "/photos/dogs/2.jpg": "dog-2",
    }
    photos.delete(["bare-3"])
    assert photos.ids_by_path(["/new/3.jpg"]) == {}


def test_ids_by_path_answers_many_paths_at_once(filled: VectorStore, points: Points) -> None:
    wanted = {path: pid for pid, payload in zip(points.ids, points.payloads, strict=True) for path in payload["paths"]}
    asked = [*wanted, *(f"/unknown/{i}.jpg" for i in range(50))]
    assert filled.ids_by_path(asked) == wanted


def test_updates_survive_close_and_reopen(photos: VectorStore, reopen: Callable[..., VectorStore]) -> None:
    result = photos.update_payloads(
        {"cat-1": PayloadUpdate(add={"tags": ("red",)}, captions={"big-vlm": "a cat"}, set={"height": None})}
    )
    photos.save()
    again = reopen(photos)
    assert stored_payload(again, "cat-1") == result["cat-1"]
    assert again.ids_by_path(["/photos/cats/1.jpg"]) == {"/photos/cats/1.jpg": "cat-1"}


def test_interleaved_updates_through_two_handles_keep_every_change(photos: VectorStore, collection: Collection) -> None:
    other = other_handle(photos, collection)
    photos.update_payloads({"cat-1": PayloadUpdate(captions={"deepseek-vl-1.3b": "a cat"})})
    other.update_payloads({"cat-1": PayloadUpdate(add={"paths": ("/copies/cat.jpg",)})})
    photos.update_payloads({"cat-1": PayloadUpdate(add={"tags": ("red",)})})
    other.update_payloads({"cat-1": PayloadUpdate(captions={"big-vlm": "a sleeping cat"})})
    expected = {
        **PHOTOS["cat-1"],
        "paths": ["/photos/cats/1.jpg", "/copies/cat.jpg"],
        "tags": ["cat", "sofa", "red"],
        "captions": {"tiny-vlm": "a cat on a sofa", "deepseek-vl-1.3b": "a cat", "big-vlm": "a sleeping cat"},
    }
    assert stored_payload(photos, "cat-1") == expected
    assert stored_payload(other, "cat-1") == expected
    assert photos.ids_by_path(["/copies/cat.jpg"]) == {"/copies/cat.jpg": "cat-1"}


@pytest.mark.parametrize(
    "fields",
    [{"add": {"width": ("1",)}}, {"remove": {"captions": ("x",)}}, {"set": {"tags": []}, "add": {"tags": ("a",)}}],
    ids=["add_to_a_non_list", "remove_from_a_non_list", "set_and_changed"],
)
def test_payload_updates_that_cannot_work_are_refused(fields: dict[str, dict[str, object]]) -> None:
    with pytest.raises(InvalidQuery):
        PayloadUpdate(**fields)  # type: ignore[arg-type]


# --- writes that merge with what another process stored meanwhile -----------------------------------------


def test_an_upsert_merging_with_an_existing_point_keeps_its_vector_payload_and_gains_the_new_paths(
    photos: VectorStore,
) -> None:
    before = photos.get(["cat-1"], with_vectors=True)[0]
    other = isotropic(2, CONTRACT_DIM, seed=31)
    new_payloads = [
        {"paths": ["/second/cat.jpg", "/photos/cats/1.jpg"], "width": 1, "mtime": 5.0, "captions": {"m2": "new"}},
        {"paths": ["/fresh.jpg"], "width": 7},
    ]
    photos.upsert(["cat-1", "fresh-4"], other, new_payloads, merge_existing=True)
    merged, fresh = photos.get(["cat-1", "fresh-4"], with_vectors=True)
    assert merged.vector is not None and before.vector is not None
    assert np.array_equal(merged.vector, before.vector)  # the stored image keeps its vector
    expected = PayloadUpdate(
        add={"paths": ("/second/cat.jpg",)}, set={"mtime": 5.0}, captions={"m2": "new"}
    ).apply(PHOTOS["cat-1"])
    assert merged.payload == expected  # its own width, one more path, a missing field, another model's caption
    assert fresh.payload == new_payloads[1] and fresh.vector is not None and np.allclose(fresh.vector, other[1])
    assert photos.ids_by_path(["/second/cat.jpg"]) == {"/second/cat.jpg": "cat-1"}
    assert photos.search(before.vector, k=1)[0].id == "cat-1"


def test_a_delete_only_if_empty_spares_points_that_still_hold_a_value(photos: VectorStore) -> None:
    photos.update_payloads({"bare-3": PayloadUpdate(set={"paths": None})})
    assert photos.delete(["cat-1", "bare-3", "missing"], only_if_empty=("paths", "blob")) == 1
    assert [record.id for record in photos.get(["cat-1", "bare-3"])] == ["cat-1"]
    kept_bytes = PayloadUpdate(set={"blob": "ab/cd"}, remove={"paths": tuple(PHOTOS["dog-2"]["paths"])})
    photos.update_payloads({"dog-2": kept_bytes})
    assert photos.delete(["dog-2"], only_if_empty=("paths", "blob")) == 0  # its bytes are kept: it stays
    assert photos.delete(["dog-2"]) == 1
    assert photos.count() == 1
