"""Collections and images: list, create, describe, drop, duplicates, tag export; an image, its thumbnail, similar
images, deleting one."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core.service import Service
from tests.api.conftest import Keys, Server, Template, error_of, jsonl


@pytest.fixture(scope="module")
def reader(server: Server, keys: Keys) -> Iterator:
    with server.client(keys.read) as client:
        yield client


@pytest.fixture(scope="module")
def writer(server: Server, keys: Keys) -> Iterator:
    with server.client(keys.write) as client:
        yield client


def test_collections_are_listed_and_described(reader, server_service: Service) -> None:
    listed = reader.get("/v1/collections")
    assert listed.status_code == 200
    assert {"shapes", "other"} <= set(listed.json()["collections"])
    info = reader.get("/v1/collections/shapes").json()
    assert info["collection"] == "shapes" and info["count"] == 12
    assert info["manifest"]["encoder"] == "shapes-clip" and info["manifest"]["store"] == "faiss"
    assert info == server_service.info("shapes").to_dict()
    missing = reader.get("/v1/collections/absent")
    assert missing.status_code == 404 and error_of(missing) == {
        "code": "collection_not_found",
        "message": "no collection 'absent'",
    }


def test_a_collection_is_created_refused_twice_and_dropped(writer) -> None:
    created = writer.post("/v1/collections", json={"name": "made-here", "model": "shapes-clip"})
    assert created.status_code == 201, created.text
    assert created.json()["count"] == 0 and created.json()["manifest"]["encoder"] == "shapes-clip"
    again = writer.post("/v1/collections", json={"name": "made-here"})
    assert again.status_code == 409 and error_of(again)["code"] == "collection_exists"
    assert "made-here" in writer.get("/v1/collections").json()["collections"]
    dropped = writer.delete("/v1/collections/made-here")
    assert dropped.status_code == 200 and dropped.json() == {"collection": "made-here", "dropped": True}
    assert writer.get("/v1/collections/made-here").status_code == 404
    gone = writer.delete("/v1/collections/made-here")
    assert gone.status_code == 404 and error_of(gone)["code"] == "collection_not_found"


@pytest.mark.parametrize(
    "body",
    [{"name": "../escape"}, {"name": ".hidden"}, {"name": ""}, {"name": "a" * 101}, {"name": "ok", "size": 3}, {}],
)
def test_bad_collection_names_are_refused(writer, body: dict) -> None:
    response = writer.post("/v1/collections", json=body)
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "bad-model", "model": "no-such-model"},
        {"name": "bad-model", "model": "ViT-B-32"},  # real, but not one this server serves: nothing is fetched
        {"name": "bad-model", "model": "shapes-clip", "pretrained": "/etc/passwd"},  # no weights from clients
    ],
)
def test_only_the_servers_encoders_make_collections(writer, body: dict) -> None:
    response = writer.post("/v1/collections", json=body)
    assert response.status_code in (400, 422), response.text
    assert error_of(response)["code"] in ("invalid_query", "invalid_request")
    assert writer.get("/v1/collections/bad-model").status_code == 404


def test_duplicates_group_the_copied_scene(reader) -> None:
    response = reader.get("/v1/collections/shapes/duplicates")
    assert response.status_code == 200
    body = response.json()
    assert body["threshold"] == 0.95
    names = [sorted(Path(p).name for m in g["members"] for p in m["paths"]) for g in body["groups"]]
    assert ["00000.png", "copy-of-00000.png"] in names
    assert reader.get("/v1/collections/shapes/duplicates", params={"threshold": 2}).status_code == 422


def test_tags_export_streams_jsonl_and_csv(reader) -> None:
    with reader.stream("GET", "/v1/collections/shapes/tags/export") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert "chunked" in response.headers.get("transfer-encoding", "")
        rows = jsonl(response.read().decode())
    assert len(rows) == 12 and set(rows[0]) == {"id", "paths", "tags"}
    text = reader.get("/v1/collections/shapes/tags/export", params={"format": "csv"})
    assert text.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(text.text)))
    assert table[0] == ["id", "paths", "tag", "score"] and len({row[0] for row in table[1:]}) == 12
    bad = reader.get("/v1/collections/shapes/tags/export", params={"format": "xml"})
    assert bad.status_code == 422 and error_of(bad)["code"] == "invalid_request"
    assert reader.get("/v1/collections/absent/tags/export").status_code == 404


def test_an_image_record_and_its_thumbnail(reader, image_ids: list[str]) -> None:
    image_id = image_ids[0]
    record = reader.get(f"/v1/collections/shapes/images/{image_id}")
    assert record.status_code == 200, record.text
    body = record.json()
    assert body["id"] == image_id and body["paths"] and body["payload"]["width"] == 64
    thumb = reader.get(body["thumbnail_url"], params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumb.content))
    assert picture.format == "JPEG" and max(picture.size) == 32
    assert reader.get(body["thumbnail_url"], params={"size": 32}).content == thumb.content  # from the cache
    assert max(Image.open(io.BytesIO(reader.get(body["thumbnail_url"]).content)).size) == 64  # never enlarged
    for size in (8, 5000, "big"):
        refused = reader.get(body["thumbnail_url"], params={"size": size})
        assert refused.status_code == 422 and error_of(refused)["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("suffix", "status", "code"),
    [("", 404, "point_not_found"), ("/thumbnail", 404, "point_not_found"), ("/similar", 404, "point_not_found")],
)
def test_unknown_images_are_404(reader, suffix: str, status: int, code: str) -> None:
    response = reader.get(f"/v1/collections/shapes/images/{'ab' * 32}{suffix}")
    assert response.status_code == status and error_of(response)["code"] == code
    malformed = reader.get(f"/v1/collections/shapes/images/NOT-AN-ID{suffix}")
    assert malformed.status_code == 422 and error_of(malformed)["code"] == "invalid_request"
    absent = reader.get(f"/v1/collections/absent/images/{'ab' * 32}{suffix}")
    assert absent.status_code == 404 and error_of(absent)["code"] == "collection_not_found"


def test_similar_images_never_return_the_image_itself(reader, image_ids: list[str], template: Template) -> None:
    image_id = image_ids[1]
    response = reader.get(f"/v1/collections/shapes/images/{image_id}/similar", params={"k": 4})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 4 and image_id not in [hit["id"] for hit in hits]
    prefix = str(template.scenes / "0000")
    params = {"k": 20, "path_prefix": prefix, "min_width": 10, "tags_any": []}
    filtered = reader.get(f"/v1/collections/shapes/images/{image_id}/similar", params=params).json()["hits"]
    assert filtered and all(any(p.startswith(prefix) for p in hit["paths"]) for hit in filtered)
    assert reader.get(f"/v1/collections/shapes/images/{image_id}/similar", params={"k": 101}).status_code == 400
    unknown = reader.get(f"/v1/collections/shapes/images/{image_id}/similar", params={"bogus": 1})
    assert unknown.status_code == 422


def test_deleting_an_image(writer, server_service: Service, template: Template, tmp_path: Path) -> None:
    # a collection of its own, indexed by another process (this one) while the server runs
    result = server_service.index([template.scenes / "00001.png", template.scenes / "00002.png"], "scratch")
    assert result.count == 2
    image_id = server_service.point_ids("scratch")[0]
    assert writer.get("/v1/collections/scratch").json()["count"] == 2
    deleted = writer.delete(f"/v1/collections/scratch/images/{image_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"collection": "scratch", "deleted": 1, "count": 1}
    assert writer.get(f"/v1/collections/scratch/images/{image_id}").status_code == 404
    again = writer.delete(f"/v1/collections/scratch/images/{image_id}")
    assert again.status_code == 404 and error_of(again)["code"] == "point_not_found"
    assert writer.delete("/v1/collections/scratch").status_code == 200
