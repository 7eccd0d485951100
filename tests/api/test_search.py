"""POST /v1/search, /v1/search/image, /v1/search/url: answers equal the service's, every option, every refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.service import Filter, Query, Service
from tests.api.conftest import Keys, Server, Template, error_of, scene_bytes


@pytest.fixture(scope="module")
def reader(server: Server, keys: Keys) -> Iterator:
    with server.client(keys.read) as client:
        yield client


def test_text_search_answers_what_the_service_answers(reader, server_service: Service) -> None:
    response = reader.post("/v1/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = server_service.search(Query(text="a red circle", k=5), "shapes")
    assert [hit["id"] for hit in body["hits"]] == [hit.id for hit in expected.hits]
    assert [hit["score"] for hit in body["hits"]] == pytest.approx([hit.score for hit in expected.hits], abs=1e-5)
    assert body["collection"] == "shapes"
    assert body["encoder"]["name"] == "shapes-clip" and body["encoder"]["weights"].startswith("sha256:")
    assert body["encoder"]["dim"] > 0
    assert body["generative_model"] == {"source": "shapes-vlm", "identity": None}  # not used by this request
    assert body["took_ms"] > 0
    hit = body["hits"][0]
    assert set(hit) == {
        "id", "path", "paths", "score", "rerank_score", "final_score", "relevance", "caption", "payload",
        "thumbnail_url", "image_url",
    }  # fmt: skip
    assert hit["thumbnail_url"] == f"/v1/collections/shapes/images/{hit['id']}/thumbnail"
    assert hit["payload"]["width"] == 64 and hit["payload"]["format"] == "PNG"
    assert hit["rerank_score"] is None and hit["caption"] is None


def test_paging_filters_and_min_score(reader, server_service: Service, template: Template) -> None:
    first = reader.post("/v1/search", json={"text": "a blue square", "k": 4}).json()["hits"]
    second = reader.post("/v1/search", json={"text": "a blue square", "k": 2, "offset": 2}).json()["hits"]
    assert [hit["id"] for hit in second] == [hit["id"] for hit in first[2:4]]
    prefix = str(template.scenes.parent)  # the server's paths are the template's (indexed there)
    flt = {"path_prefix": prefix + "/scenes/copy", "min_width": 64, "max_width": 64, "min_bytes": 1}
    hits = reader.post("/v1/search", json={"text": "a circle", "filter": flt}).json()["hits"]
    assert len(hits) == 1 and any(Path(p).name == "copy-of-00000.png" for p in hits[0]["paths"])
    none = reader.post("/v1/search", json={"text": "a circle", "filter": {"tags_all": ["nope"], "tags_any": []}})
    assert none.json()["hits"] == []
    assert reader.post("/v1/search", json={"text": "a circle", "filter": {"max_height": 10}}).json()["hits"] == []
    expected = server_service.search(Query(text="a circle", k=10, filter=Filter(min_height=1, max_bytes=10**9)))
    got = reader.post("/v1/search", json={"text": "a circle", "filter": {"min_height": 1, "max_bytes": 10**9}})
    assert [hit["id"] for hit in got.json()["hits"]] == [hit.id for hit in expected.hits]
    high = reader.post("/v1/search", json={"text": "a circle", "min_score": 0.99}).json()["hits"]
    assert all(hit["score"] >= 0.99 for hit in high)


def test_search_by_stored_image_with_text_and_negative(reader, image_ids: list[str]) -> None:
    body = {"image_id": image_ids[0], "text": "a shape", "negative": "green", "text_weight": 0.5, "k": 3}
    response = reader.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    assert image_ids[0] not in [hit["id"] for hit in response.json()["hits"]]  # a stored image never finds itself


def test_keyword_and_hybrid_modes(reader) -> None:
    keyword = reader.post("/v1/search", json={"text": "copy", "mode": "keyword"})
    assert keyword.status_code == 200, keyword.text
    assert any("copy-of-00000.png" in path for path in keyword.json()["hits"][0]["paths"])
    hybrid = reader.post("/v1/search", json={"text": "copy", "mode": "hybrid", "k": 3})
    assert hybrid.status_code == 200 and len(hybrid.json()["hits"]) == 3


def test_rerank_and_captions_use_the_generative_model(reader) -> None:
    body = {"text": "a red circle", "k": 3, "rerank": True, "rerank_k": 5, "captions": True, "fusion_weight": 0.5}
    response = reader.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["generative_model"]["identity"].startswith("sha256:")
    for hit in result["hits"]:
        assert hit["rerank_score"] is not None and hit["final_score"] is not None
        assert hit["caption"] and hit["payload"]["captions"][result["generative_model"]["identity"]] == hit["caption"]
    finals = [hit["final_score"] for hit in result["hits"]]
    assert finals == sorted(finals, reverse=True)


def test_min_relevance_sort_by_date_and_taken_filters(reader, server_service: Service) -> None:
    flt = {"taken_after": "2000-01-01", "taken_before": "2100-01-01T00:00:00"}
    body = {"text": "a red circle", "k": 5, "rerank_k": 12, "min_relevance": 0.2, "sort": "date", "filter": flt}
    response = reader.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    expected = server_service.search(
        Query(text="a red circle", k=5, rerank_k=12, min_relevance=0.2, sort="date",
              filter=Filter(taken_after="2000-01-01", taken_before="2100-01-01")),
        "shapes",
    )  # fmt: skip
    assert [hit["id"] for hit in hits] == [hit.id for hit in expected.hits]
    assert all(hit["relevance"] is not None and hit["relevance"] >= 0.2 for hit in hits)  # P("Yes") of shapes-vlm
    taken = [hit["payload"]["taken"] for hit in hits]
    assert taken == sorted(taken, reverse=True)
    future = reader.post("/v1/search", json={"text": "a circle", "filter": {"taken_after": "2100-01-01"}})
    assert future.status_code == 200 and future.json()["hits"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_query"),  # neither text nor image
        ({"text": "x", "filter": {"taken_after": "last tuesday"}}, 422, "invalid_request"),
        ({"text": "x", "min_relevance": 1.5}, 422, "invalid_request"),
        ({"text": "x", "sort": "size"}, 422, "invalid_request"),
        ({"text": "x", "k": 0}, 422, "invalid_request"),
        ({"text": "x", "k": 101}, 400, "invalid_query"),  # VLSEARCH_API_MAX_K
        ({"text": "x", "offset": 10_001}, 400, "invalid_query"),
        ({"text": "x", "offset": -1}, 422, "invalid_request"),
        ({"text": "x", "rerank": True, "rerank_k": 101}, 400, "invalid_query"),
        ({"text": "x", "mode": "fuzzy"}, 422, "invalid_request"),
        ({"text": "x", "mode": "keyword", "min_score": 0.2}, 400, "invalid_query"),
        ({"text": "x", "tags_any": ["a"]}, 422, "invalid_request"),  # unknown field: not silently ignored
        ({"text": "x", "filter": {"tag_any": ["a"]}}, 422, "invalid_request"),
        ({"image_id": "not-an-id"}, 422, "invalid_request"),
        ({"image_id": "ab" * 32}, 404, "point_not_found"),
        ({"text": "x", "collection": "absent"}, 404, "collection_not_found"),
        ({"text": "x" * 2001}, 422, "invalid_request"),
    ],
)
def test_bad_searches_are_json_errors(reader, body: dict, status: int, code: str) -> None:
    response = reader.post("/v1/search", json=body)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_malformed_json_is_a_422(reader) -> None:
    response = reader.post("/v1/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


def test_upload_search_finds_the_same_image_first(reader, template: Template) -> None:
    data = scene_bytes(template, "00003.png")
    response = reader.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    top = response.json()["hits"][0]
    assert any(path.endswith("00003.png") for path in top["paths"]) and top["score"] > 0.99


def test_upload_options_as_fields_or_one_json_field(reader, template: Template) -> None:
    data = scene_bytes(template)
    files = {"file": ("q.png", data, "image/png")}
    options = {"k": 2, "text": "a shape", "filter": {"min_width": 1}}
    as_json = reader.post("/v1/search/image", files=files, data={"options": json.dumps(options)})
    assert as_json.status_code == 200, as_json.text
    assert len(as_json.json()["hits"]) == 2
    fields = {"k": "4", "text": "a shape", "filter": json.dumps({"min_width": 1}), "options": json.dumps({"k": 2})}
    overridden = reader.post("/v1/search/image", files=files, data=fields)
    assert len(overridden.json()["hits"]) == 4  # a field of its own wins over the JSON object


def test_upload_and_similar_searches_take_the_date_order_and_bounds(reader, template: Template, image_ids) -> None:
    files = {"file": ("q.png", scene_bytes(template), "image/png")}
    bounds = {"taken_after": "2000-01-01", "taken_before": "2100-01-01"}
    fields = {"k": "5", "sort": "date", "filter": json.dumps(bounds)}
    response = reader.post("/v1/search/image", files=files, data=fields)
    assert response.status_code == 200, response.text
    taken = [hit["payload"]["taken"] for hit in response.json()["hits"]]
    assert len(taken) == 5 and taken == sorted(taken, reverse=True)
    similar = f"/v1/collections/shapes/images/{image_ids[0]}/similar"
    assert len(reader.get(similar, params={"k": 3, "taken_after": "2000-01-01"}).json()["hits"]) == 3
    assert reader.get(similar, params={"taken_after": "2100-01-01"}).json()["hits"] == []
    bad = reader.get(similar, params={"taken_before": "June"})
    assert bad.status_code == 422 and error_of(bad)["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("files", "data", "status", "code"),
    [
        ({"file": ("q.txt", b"hello, not an image", "text/plain")}, {}, 400, "unsupported_image"),
        ("scene", {"filter": json.dumps({"taken_after": "2021-13-01"})}, 422, "invalid_request"),
        ("scene", {"text": "x", "min_relevance": "nan"}, 422, "invalid_request"),
        ("scene", {"sort": "newest"}, 422, "invalid_request"),
        ({"file": ("q.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}, {}, 400, "corrupt_image"),
        (None, {"k": "3"}, 422, "invalid_request"),  # no file
        ("scene", {"k": "zero"}, 422, "invalid_request"),
        ("scene", {"options": "{not json"}, 422, "invalid_request"),
        ("scene", {"options": json.dumps({"k": 500})}, 400, "invalid_query"),
        ("scene", {"options": json.dumps({"bogus": 1})}, 422, "invalid_request"),
        ("scene", {"unknown_field": "1"}, 422, "invalid_request"),
    ],
)
def test_bad_uploads_are_json_errors(reader, template: Template, files, data, status: int, code: str) -> None:
    if files == "scene":
        files = {"file": ("q.png", scene_bytes(template), "image/png")}
    response = reader.post("/v1/search/image", files=files, data=data)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_url_search_fetches_and_finds_the_image(reader, image_site: str) -> None:
    response = reader.post("/v1/search/url", json={"url": f"{image_site}/00005.png", "k": 2})
    assert response.status_code == 200, response.text
    assert response.json()["hits"][0]["path"].endswith("00005.png")


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://10.1.2.3/x.png", 400, "fetch_refused"),  # private: refused before any connection
        ("http://169.254.169.254/latest/meta-data", 400, "fetch_refused"),
        ("file:///etc/passwd", 400, "fetch_refused"),
        ("not a url", 400, "fetch_refused"),
        ("{site}/missing.png", 503, "fetch_failed"),
        ("{site}/scenes.jsonl", 400, "unsupported_image"),
    ],
)
def test_bad_urls_are_refused(reader, image_site: str, url: str, status: int, code: str) -> None:
    response = reader.post("/v1/search/url", json={"url": url.format(site=image_site)})
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
