"""The auth matrix over every route: no key and a wrong key 401, a read key 403 on write routes, a write key
through, a key limited to collection `other` 404 on everything of `shapes` (as if absent); open routes open."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.conftest import Keys, Server, Template, error_of, scene_bytes

IMAGE = "{image}"
JOB = "{job}"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # on collection `shapes`, with {image} and {job} filled in
    scope: str | None  # None: open
    body: Callable[[Template], dict[str, Any]] = lambda _: {}
    ok: int = 200  # the answer of a key with the scope (the write key on a harmless path)
    harmless: str | None = None  # what the write key asks instead of a destructive path
    limited: int = 404  # the limited key's answer on `shapes`
    extra: dict[str, Any] = field(default_factory=dict)


def _upload(template: Template) -> dict[str, Any]:
    return {"files": {"file": ("q.png", scene_bytes(template), "image/png")}, "data": {"k": "2"}}


ROUTES = [
    Route("POST", "/v1/search", "read", lambda _: {"json": {"text": "a circle", "k": 2}}),
    Route("POST", "/v1/search/image", "read", _upload),
    # refused by the fetcher once past auth; the limited key never gets that far (404 on the collection)
    Route("POST", "/v1/search/url", "read", lambda _: {"json": {"url": "http://10.9.9.9/x.png"}}, ok=400),
    Route("GET", "/v1/collections", "read", limited=200),
    Route("POST", "/v1/collections", "write", lambda _: {"json": {"name": "shapes"}}, ok=409),
    Route("GET", "/v1/collections/shapes", "read"),
    Route("DELETE", "/v1/collections/shapes", "write", ok=404, harmless="/v1/collections/absent"),
    Route("GET", "/v1/collections/shapes/duplicates", "read"),
    Route("GET", "/v1/collections/shapes/tags/export", "read"),
    Route("GET", f"/v1/collections/shapes/images/{IMAGE}", "read"),
    Route("GET", f"/v1/collections/shapes/images/{IMAGE}/thumbnail", "read"),
    Route("GET", f"/v1/collections/shapes/images/{IMAGE}/similar", "read"),
    Route(
        "DELETE",
        f"/v1/collections/shapes/images/{IMAGE}",
        "write",
        ok=404,
        harmless="/v1/collections/shapes/images/" + "ab" * 32,
    ),
    Route("POST", "/v1/jobs", "write", lambda _: {"json": {"kind": "caption", "collection": "shapes"}}, ok=202),
    Route("GET", "/v1/jobs", "read", limited=200),
    Route("GET", f"/v1/jobs/{JOB}", "read"),
    Route("DELETE", f"/v1/jobs/{JOB}", "write"),
    Route("POST", "/v1/ask", "read", lambda _: {"json": {"image_id": IMAGE, "question": "Is there a circle?"}}),
    # clip-retrieval's routes: a raw JSON body without Content-Type, as ClipClient posts it
    Route(
        "POST", "/knn-service", "read", lambda _: {"content": json.dumps({"text": "a circle", "indice_name": "shapes"})}
    ),
    Route("POST", "/metadata", "read", lambda _: {"content": json.dumps({"ids": [IMAGE], "indice_name": "shapes"})}),
    Route("GET", "/indices-list", "read", limited=200),
    Route("GET", "/config.json", "read", limited=200),
    Route("GET", "/healthz", None),
    Route("GET", "/readyz", None),
    Route("GET", "/metrics", None),
]


def _fill(value: Any, image: str, job: str) -> Any:
    if isinstance(value, str):
        return value.replace(IMAGE, image).replace(JOB, job)
    if isinstance(value, dict):
        return {key: _fill(item, image, job) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def shapes_job(server: Server, keys: Keys, created_jobs: list[str]) -> str:
    with server.client(keys.write) as client:
        response = client.post("/v1/jobs", json={"kind": "tag", "collection": "shapes"})
    assert response.status_code == 202, response.text
    created_jobs.append(response.json()["id"])
    return str(response.json()["id"])


def _headers(who: str, keys: Keys) -> dict[str, str]:
    if who == "none":
        return {}
    if who == "wrong":
        return {"Authorization": "Bearer vls_not-a-key-of-this-server"}
    if who == "write":  # the other header form
        return {"X-API-Key": keys.write}
    return {"Authorization": f"Bearer {getattr(keys, who)}"}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_auth_matrix(
    route: Route,
    server: Server,
    keys: Keys,
    template: Template,
    image_ids: list[str],
    shapes_job: str,
    created_jobs: list[str],
) -> None:
    with server.client() as client:
        answers: dict[str, httpx.Response] = {}
        for who in ("none", "wrong", "read", "write", "limited"):
            path = route.harmless if who == "write" and route.harmless else route.path
            kwargs = _fill(route.body(template), image_ids[0], shapes_job)
            answers[who] = client.request(
                route.method, _fill(path, image_ids[0], shapes_job), headers=_headers(who, keys), **kwargs
            )
            if answers[who].status_code == 202:
                created_jobs.append(answers[who].json()["id"])
    statuses = {who: answer.status_code for who, answer in answers.items()}
    if route.scope is None:
        assert set(statuses.values()) == {200}, statuses
        return
    assert statuses["none"] == 401 and statuses["wrong"] == 401, statuses
    for who in ("none", "wrong"):
        assert error_of(answers[who])["code"] == "unauthorized"
        assert answers[who].headers["www-authenticate"].startswith("Bearer")
    if route.scope == "write":
        assert statuses["read"] == 403 and error_of(answers["read"])["code"] == "forbidden", statuses
    else:
        assert statuses["read"] == route.ok, (statuses, answers["read"].text)
    assert statuses["write"] == route.ok, (statuses, answers["write"].text)
    assert statuses["limited"] == route.limited, (statuses, answers["limited"].text)
    if route.limited == 404:
        assert error_of(answers["limited"])["code"] in ("collection_not_found", "job_not_found")


def test_a_limited_key_sees_only_its_collections(server: Server, keys: Keys, shapes_job: str) -> None:
    with server.client(keys.limited) as limited, server.client(keys.write) as writer:
        # the server's default (shapes) is not named to a key that may not see it
        assert limited.get("/v1/collections").json() == {"collections": ["other"], "default": None}
        assert writer.get("/v1/collections").json()["default"] == "shapes"
        assert limited.get("/v1/collections/other").status_code == 200
        assert shapes_job not in [job["id"] for job in limited.get("/v1/jobs").json()["jobs"]]
        hidden, absent = limited.get("/v1/collections/shapes"), limited.get("/v1/collections/nothing-here")
        assert error_of(hidden)["message"] == "no collection 'shapes'"  # reads like a missing one:
        assert error_of(absent)["message"] == "no collection 'nothing-here'"
        hits = limited.post("/v1/search", json={"text": "a circle", "collection": "other"})
        assert hits.status_code == 200 and len(hits.json()["hits"]) == 3
        assert limited.post("/v1/collections", json={"name": "elsewhere"}).status_code == 404
        assert writer.get("/v1/collections/shapes").json()["count"] == 12  # nothing of it was touched
    with server.client(keys.other_read) as reader:
        assert reader.delete("/v1/collections/other").status_code == 403
        assert reader.get("/v1/collections/other").status_code == 200
