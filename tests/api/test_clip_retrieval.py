"""clip-retrieval compatibility: its own ClipClient (the real module of the PyPI package) and requests shaped like
its front end's get vlsearch's answers from /knn-service, /metadata, /indices-list and /config.json.

ClipClient posts with `requests` (its calls are not recorded); every route is also called through the recording
Client here, for the schema check of test_zz_openapi.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from api.routes.clip_retrieval import clip_metadata
from core.service import HitView, Service
from tests.api.conftest import Client, Keys, Server, Template, error_of, scene_bytes

CLIP_RETRIEVAL_VERSION = "2.45.0"  # the Makefile installs it with --no-deps: only clip_client.py is used
# What clip-retrieval's front end posts (front/build/main.*.js, callClipService), with its defaults.
FRONT_END_BODY: dict[str, Any] = {
    "text": "a red circle",
    "image": None,
    "image_url": None,
    "embedding_input": None,
    "modality": "image",
    "num_images": 3,
    "indice_name": "shapes",
    "num_result_ids": 3000,
    "use_mclip": False,
    "deduplicate": True,
    "use_safety_model": True,
    "use_violence_detector": True,
    "aesthetic_score": "",
    "aesthetic_weight": "0.5",
}


@pytest.fixture(scope="module")
def clip_client() -> ModuleType:
    """clip_retrieval/clip_client.py loaded by path: the package's __init__ imports its whole back end (torch,
    faiss, flask, ...), which it was installed without."""
    try:
        distribution = importlib.metadata.distribution("clip-retrieval")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"clip-retrieval is not installed: pip install --no-deps clip-retrieval=={CLIP_RETRIEVAL_VERSION}")
    assert distribution.version == CLIP_RETRIEVAL_VERSION
    path = Path(str(distribution.locate_file("clip_retrieval/clip_client.py")))
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reader(server: Server, keys: Keys) -> Iterator[Client]:
    with server.client(keys.read) as client:
        yield client


@pytest.fixture(scope="module")
def anonymous(server: Server) -> Iterator[Client]:
    with server.client() as client:
        yield client


def knn_url(server: Server, key: str) -> str:
    return f"{server.base_url}/knn-service?key={key}"  # as ClipClient users pass it


def v1_ids(reader: Client, k: int, **body: Any) -> list[str]:
    response = reader.post("/v1/search", json={"k": k, **body})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["hits"]]


def test_clip_client_text_query_gets_what_v1_search_answers(
    clip_client: ModuleType, server: Server, keys: Keys, reader: Client
) -> None:
    client = clip_client.ClipClient(knn_url(server, keys.read), indice_name="shapes", num_images=5)
    results = client.query(text="a red circle")
    expected = reader.post("/v1/search", json={"text": "a red circle", "k": 5}).json()["hits"]
    assert [result["id"] for result in results] == [hit["id"] for hit in expected]
    assert [result["similarity"] for result in results] == pytest.approx([hit["score"] for hit in expected], abs=1e-5)
    first = results[0]
    assert set(first) - {"caption"} == {"id", "similarity", "image_path", "image"}  # no URL (files): left out
    assert first["image_path"] == expected[0]["path"]
    assert base64.b64decode(first["image"]).startswith(b"\xff\xd8")  # a JPEG thumbnail, what the front end shows


def test_clip_client_image_file_query_gets_what_v1_image_search_answers(
    clip_client: ModuleType, server: Server, keys: Keys, reader: Client, template: Template
) -> None:
    client = clip_client.ClipClient(knn_url(server, keys.read), indice_name="shapes", num_images=4)
    results = client.query(image=str(template.scenes / "00003.png"))
    files = {"file": ("q.png", scene_bytes(template, "00003.png"), "image/png")}
    expected = reader.post("/v1/search/image", files=files, data={"k": "4"}).json()["hits"]
    assert [result["id"] for result in results] == [hit["id"] for hit in expected]
    assert results[0]["image_path"].endswith("00003.png") and results[0]["similarity"] > 0.99


def test_clip_client_embedding_query_gets_what_v1_search_answers_for_its_text(
    clip_client: ModuleType, server: Server, keys: Keys, reader: Client, server_service: Service
) -> None:
    encoder = server_service.container.encoder_for(server_service.store("shapes"))  # shapes-clip, as the server's
    embedding = encoder.encode_texts(["a blue square"])[0].tolist()
    client = clip_client.ClipClient(knn_url(server, keys.read), indice_name="shapes", num_images=6)
    results = client.query(embedding_input=embedding)
    assert [result["id"] for result in results] == v1_ids(reader, 6, text="a blue square")
    unnormalised = client.query(embedding_input=[3.0 * value for value in embedding])
    assert [result["similarity"] for result in unnormalised] == pytest.approx(
        [result["similarity"] for result in results], abs=1e-5
    )
    zero = reader.post("/knn-service", content=json.dumps({"embedding_input": [0.0] * len(embedding)}))
    assert zero.status_code == 400 and error_of(zero)["code"] == "invalid_query"


def test_clip_client_image_url_query_goes_through_the_safe_fetcher(
    clip_client: ModuleType, server: Server, keys: Keys, reader: Client, image_site: str
) -> None:
    client = clip_client.ClipClient(knn_url(server, keys.read), indice_name="shapes", num_images=2)
    results = client.query(image=f"{image_site}/00005.png")  # ClipClient sends an http(s) "image" as image_url
    assert results[0]["image_path"].endswith("00005.png") and results[0]["similarity"] > 0.99
    refused = reader.post("/knn-service", content=json.dumps({"image_url": "http://10.1.2.3/x.png"}))
    assert refused.status_code == 400 and error_of(refused)["code"] == "fetch_refused"


def test_a_front_end_text_plain_body_is_answered_and_metadata_fills_the_rest(reader: Client) -> None:
    headers = {"Content-Type": "text/plain;charset=UTF-8"}
    response = reader.post("/knn-service", content=json.dumps(FRONT_END_BODY), headers=headers)
    assert response.status_code == 200, response.text
    results = response.json()
    assert [result["id"] for result in results] == v1_ids(reader, 12, text="a red circle")  # all 12, under the cap
    assert all("image" in result for result in results[:3])
    assert all(set(result) == {"id", "similarity"} for result in results[3:])  # the front end asks /metadata
    rest = [result["id"] for result in results[3:6]]
    metadata = reader.post("/metadata", content=json.dumps({"ids": rest, "indice_name": "shapes"}), headers=headers)
    assert metadata.status_code == 200, metadata.text
    assert [item["id"] for item in metadata.json()] == rest
    assert all({"image_path", "image"} <= set(item["metadata"]) for item in metadata.json())
    as_text = reader.post("/knn-service", content=json.dumps({**FRONT_END_BODY, "modality": "text"}))
    assert [result["id"] for result in as_text.json()] == [result["id"] for result in results]  # one index


def test_captions_come_from_the_payload_cache(reader: Client) -> None:
    captioned = reader.post("/v1/search", json={"text": "a green triangle", "k": 2, "captions": True})
    assert captioned.status_code == 200, captioned.text
    captions = {hit["id"]: hit["caption"] for hit in captioned.json()["hits"]}
    body = {"text": "a green triangle", "indice_name": "shapes", "num_images": 2}
    results = reader.post("/knn-service", content=json.dumps(body)).json()
    assert {result["id"]: result["caption"] for result in results} == captions


def test_metadata_leaves_out_ids_the_collection_does_not_hold(reader: Client, image_ids: list[str]) -> None:
    body = {"ids": [image_ids[1], "ab" * 16, image_ids[0]], "indice_name": "shapes"}
    response = reader.post("/metadata", content=json.dumps(body))
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()] == [image_ids[1], image_ids[0]]
    assert reader.post("/metadata", content=json.dumps({"ids": []})).json() == []


def test_indices_list_and_config_json_show_what_the_key_may_see(server: Server, keys: Keys, reader: Client) -> None:
    assert sorted(reader.get("/indices-list").json()) == ["other", "shapes"]
    config = reader.get("/config.json").json()
    assert config == {"defaultBackend": server.base_url, "defaultIndex": "shapes", "urlColumn": "url"}
    with server.client(keys.limited) as limited:
        assert limited.get("/indices-list").json() == ["other"]
        assert limited.get("/config.json").json()["defaultIndex"] == ""
        hidden = limited.post("/knn-service", content=json.dumps({"text": "a circle", "indice_name": "shapes"}))
        assert hidden.status_code == 404 and error_of(hidden)["message"] == "no collection 'shapes'"
        other = limited.post("/knn-service", content=json.dumps({"text": "a circle", "indice_name": "other"}))
        assert other.status_code == 200 and len(other.json()) == 3


def test_the_key_in_the_query_string_works_on_these_routes_only(
    anonymous: Client, keys: Keys, image_ids: list[str]
) -> None:
    key = {"key": keys.read}
    knn = json.dumps({"text": "a circle", "indice_name": "shapes", "num_images": 2})
    assert anonymous.post("/knn-service", content=knn, params=key).status_code == 200
    assert anonymous.post("/metadata", content=json.dumps({"ids": image_ids[:1]}), params=key).status_code == 200
    assert anonymous.get("/indices-list", params=key).status_code == 200
    assert anonymous.get("/config.json", params=key).status_code == 200
    for answer in (
        anonymous.post("/v1/search", json={"text": "a circle"}, params=key),  # the /v1 routes take headers only
        anonymous.post("/knn-service", content=knn),
        anonymous.post("/knn-service", content=knn, params={"key": "vls_not-a-key-of-this-server"}),
    ):
        assert answer.status_code == 401 and error_of(answer)["code"] == "unauthorized"
    header_wins = anonymous.get("/indices-list", params={"key": "wrong"}, headers={"X-API-Key": keys.read})
    assert header_wins.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 422, "invalid_request"),
        (b"\xff\xfe\x00", 422, "invalid_request"),
        (b"[1, 2]", 422, "invalid_request"),  # not an object
        ({"indice_name": "shapes"}, 400, "invalid_query"),  # nothing to look for
        ({"text": "x", "num_images": 0}, 422, "invalid_request"),
        ({"text": "x", "modality": "audio"}, 422, "invalid_request"),
        ({"text": "x", "aesthetic_score": "pretty"}, 422, "invalid_request"),
        ({"text": "x" * 2001}, 422, "invalid_request"),
        ({"image": "a"}, 422, "invalid_request"),  # not base64
        ({"image": base64.b64encode(b"hello, not an image").decode()}, 400, "unsupported_image"),
        ({"embedding_input": [0.5, 0.5]}, 409, "encoder_mismatch"),  # another dim than the collection's
        ({"embedding_input": ["x"]}, 422, "invalid_request"),
        ({"text": "x", "indice_name": "absent"}, 404, "collection_not_found"),
    ],
)
def test_bad_knn_bodies_are_json_errors(reader: Client, body: Any, status: int, code: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body)
    response = reader.post("/knn-service", content=content)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


@pytest.mark.parametrize(
    "body", [{"ids": ["not-an-id"]}, {"ids": "ab" * 16}, {"indice_name": "shapes"}, {"ids": ["ab" * 16] * 1001}]
)
def test_bad_metadata_bodies_are_json_errors(reader: Client, body: dict[str, Any]) -> None:
    response = reader.post("/metadata", content=json.dumps(body))
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request", response.text


def test_an_image_indexed_from_a_url_has_its_url_and_the_first_cached_caption(server_service: Service) -> None:
    hit = HitView(
        id="ab" * 16, score=0.5, rerank_score=None, final_score=None, path=None, paths=[], width=8, height=8,
        bytes=100, format="PNG", tags=[], captions={"sha256:one": "a red circle", "sha256:two": "a circle"},
        source_name="https://example.org/a.png",
    )  # fmt: skip
    meta = clip_metadata(hit, server_service, "shapes")  # a URL: no thumbnail is made (the front end shows the URL)
    assert meta.model_dump(exclude_none=True) == {"url": "https://example.org/a.png", "caption": "a red circle"}
