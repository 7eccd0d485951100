"""Jobs through the API against real Redis (database 9): submitted, listed, followed and cancelled (no worker runs
here: tests/workers runs jobs end to end; this checks the API's shell over workers.api)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import Keys, Server, Template, error_of


@pytest.fixture(scope="module")
def writer(server: Server, keys: Keys) -> Iterator:
    with server.client(keys.write) as client:
        yield client


def test_an_index_job_is_submitted_listed_followed_and_cancelled(
    writer, template: Template, created_jobs: list[str]
) -> None:
    response = writer.post("/v1/jobs", json={"kind": "index", "collection": "fresh", "paths": [str(template.scenes)]})
    assert response.status_code == 202, response.text
    job = response.json()
    created_jobs.append(job["id"])
    assert (job["kind"], job["collection"], job["state"], job["total"]) == ("index", "fresh", "queued", 13)
    assert job["id"] in [listed["id"] for listed in writer.get("/v1/jobs").json()["jobs"]]
    assert writer.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
    cancelled = writer.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert writer.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"


def test_an_index_job_over_urls(writer, created_jobs: list[str]) -> None:
    urls = ["https://images.example.test/a.jpg", "https://images.example.test/b.jpg"]
    response = writer.post("/v1/jobs", json={"kind": "index", "collection": "fetched", "urls": urls})
    assert response.status_code == 202, response.text
    created_jobs.append(response.json()["id"])
    assert (response.json()["total"], response.json()["options"]) == (2, {"urls": True})


def test_tag_and_caption_jobs_take_their_options(writer, created_jobs: list[str]) -> None:
    body = {"kind": "tag", "labels": ["circle", "square"], "threshold": 0.4, "verify": True}
    tag = writer.post("/v1/jobs", json=body)
    assert tag.status_code == 202, tag.text
    created_jobs.append(tag.json()["id"])
    assert tag.json()["total"] == 12 and tag.json()["options"]["threshold"] == 0.4
    assert tag.json()["options"]["verify"] is True
    assert tag.json()["options"]["labels"].endswith(".txt")  # inline labels, kept where the workers read them
    caption = writer.post("/v1/jobs", json={"kind": "caption", "collection": "other", "force": True})
    assert caption.status_code == 202, caption.text
    created_jobs.append(caption.json()["id"])
    assert (caption.json()["total"], caption.json()["options"]) == (3, {"force": True})
    assert writer.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]["id"] == caption.json()["id"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"kind": "index", "paths": ["/no/such/folder"]}, 400, "invalid_query"),
        ({"kind": "index"}, 400, "invalid_query"),
        ({"kind": "index", "paths": ["/tmp"], "urls": ["https://example.test/a.jpg"]}, 400, "invalid_query"),
        ({"kind": "index", "paths": ["/tmp"], "force": True}, 422, "invalid_request"),  # not an index option
        ({"kind": "melt"}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"kind": "tag", "threshold": 2}, 422, "invalid_request"),
        ({"kind": "tag", "labels": ["a\nb"]}, 400, "invalid_query"),
        ({"kind": "tag", "labels_file": "/no/such/labels.txt"}, 400, None),
        ({"kind": "caption", "collection": "absent"}, 404, "collection_not_found"),
    ],
)
def test_bad_jobs_are_json_errors(writer, body: dict, status: int, code: str | None) -> None:
    response = writer.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert code is None or error["code"] == code


def test_unknown_jobs_are_404(writer) -> None:
    for response in (writer.get("/v1/jobs/" + "0" * 32), writer.delete("/v1/jobs/" + "0" * 32)):
        assert response.status_code == 404 and error_of(response)["code"] == "job_not_found"
    assert writer.get("/v1/jobs", params={"limit": 0}).status_code == 422
