"""min_relevance and sort=date through the service, with the shipped shapes-vlm scoring P("Yes") for real."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from core.service import Filter, Query, Service
from core.settings import Settings
from indexer.payloads import PayloadUpdate

DAY = 86_400
START = 1_600_000_000  # 2020-09-13T12:26:40 UTC
TEXT = "a red circle"


def dated_copy(scenes_folder: Path, tmp_path: Path) -> Path:
    """The twelve scenes with mtimes a day apart in an order unrelated to their names (PNG: no EXIF, so `taken` is
    the mtime)."""
    folder = tmp_path / "dated"
    shutil.copytree(scenes_folder, folder)
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        moment = START + DAY * ((i * 5) % 12)
        os.utime(path, (moment, moment))
    return folder


@pytest.fixture
def dated(service: Service, scenes_folder: Path, tmp_path: Path) -> Path:
    folder = dated_copy(scenes_folder, tmp_path)
    assert service.index([folder]).report.added == 12
    return folder


def test_min_relevance_keeps_the_candidates_whose_p_yes_reaches_it(service: Service, dated: Path) -> None:
    everything = service.search(Query(text=TEXT, k=12, rerank_k=12, min_relevance=0.0)).hits
    assert len(everything) == 12
    relevance = [hit.relevance for hit in everything]
    assert all(value is not None and 0.0 <= value <= 1.0 for value in relevance)
    # P("Yes") of shapes-vlm itself (its default method is vqa: the rerank scores are the relevance)
    images = [service.load_image(hit.id) for hit in everything]
    model_scores = service.container.vlm().score(TEXT, images, method="vqa")
    assert relevance == pytest.approx(model_scores, abs=1e-5)
    cut = sorted(value for value in relevance if value is not None)[6]
    kept = service.search(Query(text=TEXT, k=12, rerank_k=12, min_relevance=cut)).hits
    expected = [hit.id for hit in everything if hit.relevance is not None and hit.relevance >= cut]
    assert [hit.id for hit in kept] == expected and 0 < len(kept) < 12


def test_relevance_is_p_yes_even_when_the_rerank_method_is_caption(
    shapes_settings: Settings, scenes_folder: Path, tmp_path: Path
) -> None:
    with Service(shapes_settings.model_copy(update={"vlm_score_method": "caption"})) as service:
        service.index([dated_copy(scenes_folder, tmp_path)])
        hits = service.search(Query(text=TEXT, k=12, rerank_k=12, min_relevance=0.0)).hits
        vlm = service.container.vlm()
        images = [service.load_image(hit.id) for hit in hits]
        assert [hit.rerank_score for hit in hits] == pytest.approx(vlm.score(TEXT, images, method="caption"), abs=1e-4)
        assert [hit.relevance for hit in hits] == pytest.approx(vlm.score(TEXT, images, method="vqa"), abs=1e-5)
        assert all(hit.rerank_score is not None and hit.rerank_score <= 0.0 for hit in hits)  # log-probabilities


def test_sort_by_date_orders_what_passed_the_cutoff_newest_first(service: Service, dated: Path) -> None:
    by_relevance = service.search(Query(text=TEXT, k=12, rerank_k=12, min_relevance=0.0)).hits
    cut = sorted(hit.relevance or 0.0 for hit in by_relevance)[4]
    passed = {hit.id for hit in by_relevance if (hit.relevance or 0.0) >= cut}
    hits = service.search(Query(text=TEXT, k=12, rerank_k=12, min_relevance=cut, sort="date")).hits
    assert {hit.id for hit in hits} == passed
    taken = [hit.taken for hit in hits]
    assert all(value is not None for value in taken) and taken == sorted(taken, reverse=True)  # type: ignore[type-var]
    assert hits[0].to_dict()["taken"] == taken[0] and "relevance" in hits[0].to_dict()
    # pages of the date order are slices of it
    pages = [
        service.search(Query(text=TEXT, k=3, offset=offset, rerank_k=12, min_relevance=cut, sort="date")).hits
        for offset in (0, 3, 6)
    ]
    assert [hit.id for page in pages for hit in page] == [hit.id for hit in hits]


def test_images_without_taken_come_last_in_relevance_order_and_never_match_a_date_filter(
    service: Service, dated: Path
) -> None:
    by_relevance = service.search(Query(text=TEXT, k=12, rerank_k=12, rerank=True)).hits
    undated = [hit.id for hit in by_relevance[::3]]  # four of them, in relevance order
    store = service.store()
    store.update_payloads({image_id: PayloadUpdate(set={"taken": None}) for image_id in undated})
    hits = service.search(Query(text=TEXT, k=12, rerank_k=12, rerank=True, sort="date")).hits
    assert [hit.id for hit in hits[-4:]] == undated and all(hit.taken is None for hit in hits[-4:])
    dated_hits = hits[:-4]
    assert [hit.taken for hit in dated_hits] == sorted((hit.taken or "" for hit in dated_hits), reverse=True)
    window = Filter(taken_after="2000-01-01")
    filtered = service.search(Query(text=TEXT, k=12, filter=window)).hits
    assert {hit.id for hit in filtered} == {hit.id for hit in dated_hits}


def test_a_date_bound_is_inclusive_and_a_date_alone_is_its_midnight(service: Service, dated: Path) -> None:
    third = "2020-09-15T12:26:40"  # START + 2 days: one image was taken exactly then
    assert [hit.taken for hit in service.search(Query(text=TEXT, k=12, filter=Filter(
        taken_after=third, taken_before=third))).hits] == [third]  # fmt: skip
    until_day = service.search(Query(text=TEXT, k=12, filter=Filter(taken_before="2020-09-15"))).hits
    assert sorted(hit.taken or "" for hit in until_day) == ["2020-09-13T12:26:40", "2020-09-14T12:26:40"]
