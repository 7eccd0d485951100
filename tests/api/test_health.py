"""Health, readiness, metrics, and the framework's own errors in the API's JSON shape (404, 405, 413)."""

from __future__ import annotations

import re

import httpx

from tests.api.conftest import MAIN_UPLOAD_LIMIT, Keys, Server, error_of


def test_health_and_readiness_need_no_key(server: Server) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"models": "ok", "store": "ok", "redis": "ok", "keys": "ok"},
        }


def test_metrics_count_routes_by_template_and_watch_the_queues(server: Server, keys: Keys) -> None:
    with server.client(keys.read) as client:
        assert client.post("/v1/search", json={"text": "a circle", "k": 2}).status_code == 200
        client.get("/v1/collections/shapes/images/" + "ab" * 32)  # a 404: its template, never its id
        text = client.get("/metrics").text
    assert re.search(r'vlsearch_http_requests_total\{method="POST",route="/v1/search",status="200"\} [1-9]', text)
    assert 'route="/v1/collections/{name}/images/{image_id}",status="404"' in text
    assert "ab" * 32 not in text
    assert re.search(r'vlsearch_http_request_duration_seconds_bucket\{.*route="/v1/search"', text)
    assert re.search(r'vlsearch_search_duration_seconds_count\{captions="false",mode="clip",rerank="false"\}', text)
    assert "vlsearch_redis_up 1.0" in text
    assert re.search(r'vlsearch_queue_depth\{queue="embed"\} \d', text)
    assert re.search(r'vlsearch_queue_depth\{queue="vlm"\} \d', text)
    assert re.search(r'vlsearch_jobs\{state="queued"\} \d', text)


def test_unknown_routes_and_methods_are_json(server: Server, keys: Keys) -> None:
    with server.client(keys.read) as client:
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        wrong = client.put("/v1/search", json={})
        assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"


def test_a_body_over_the_upload_limit_is_413_before_it_is_read(server: Server, keys: Keys) -> None:
    big = b"\xff" * (MAIN_UPLOAD_LIMIT + 1)
    with server.client(keys.read) as client:
        declared = client.post("/v1/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
        assert declared.status_code == 413 and error_of(declared)["code"] == "too_large"
        assert "VLSEARCH_MAX_UPLOAD_BYTES" in error_of(declared)["message"]

        def chunks(head: bytes = b""):  # no Content-Length: counted as it streams in
            yield head
            for _ in range(8):
                yield b"\xff" * (MAIN_UPLOAD_LIMIT // 4)

        part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'

        streamed = client.post(
            "/v1/search/image", content=chunks(part), headers={"Content-Type": "multipart/form-data; boundary=x"}
        )
        assert streamed.status_code == 413 and error_of(streamed)["code"] == "too_large"
        streamed_json = client.post("/v1/search", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed_json.status_code == 413
        assert client.get("/healthz").status_code == 200  # the server is fine


def test_the_openapi_schema_and_docs_are_served(server: Server) -> None:
    with httpx.Client(base_url=server.base_url) as client:  # not recorded: these are not API routes
        assert client.get("/openapi.json").json()["info"]["title"] == "vlsearch"
        assert client.get("/docs").status_code == 200
