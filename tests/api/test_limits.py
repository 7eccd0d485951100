"""Settings that change what the API lets through: the rate limit (429, then recovery), the open read mode, CORS;
and, in process, a server with no key configured (every protected route 401) and the limiter's fallback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import Principal, read_access
from api.limits import RateLimiter
from core.settings import Settings
from tests.api.conftest import REDIS_URL, Keys, Server, Template, copy_data, error_of, start_server, stop_server

RATE = 10
WINDOW = 2
ORIGIN = "https://search.example.test"


@pytest.fixture(scope="module")
def limited_server(template: Template, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Open read, a rate limit counted in Redis (database 9), CORS for one origin."""
    root = tmp_path_factory.mktemp("api-limits")
    server = start_server(
        copy_data(template, root / "data"),
        root / "server.log",
        redis_url=REDIS_URL,
        open_read="true",
        rate_limit=str(RATE),
        rate_limit_window=str(WINDOW),
        cors_origins=f'["{ORIGIN}"]',
    )
    yield server
    stop_server(server)


def test_the_rate_limit_answers_429_with_retry_after_then_recovers(
    limited_server: Server, keys: Keys, redis_client: redis.Redis
) -> None:
    with limited_server.client(keys.read) as client:
        statuses = []
        for _ in range(2 * RATE + 1):  # a burst that straddles at most one window boundary passes the limit
            response = client.get("/v1/collections")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
        assert error_of(response)["code"] == "rate_limited"
        retry = int(response.headers["retry-after"])
        assert 1 <= retry <= WINDOW
        assert list(redis_client.scan_iter("vlsearch:ratelimit:key:*"))  # counted in Redis, shared by processes
        with limited_server.client(keys.write) as other:
            assert other.get("/v1/collections").status_code == 200  # per key: another key is not held back
        time.sleep(retry)
        assert client.get("/v1/collections").status_code == 200


def test_open_read_lets_anyone_read_but_not_write(limited_server: Server, keys: Keys) -> None:
    with limited_server.client() as anonymous:
        assert anonymous.post("/v1/search", json={"text": "a circle", "k": 2}).status_code == 200
        assert anonymous.get("/v1/collections/shapes").status_code == 200
        write = anonymous.delete("/v1/collections/shapes")
        assert write.status_code == 401 and error_of(write)["code"] == "unauthorized"
        jobs = anonymous.post("/v1/jobs", json={"kind": "caption"})
        assert jobs.status_code == 401
    with limited_server.client("vls_wrong") as wrong:
        assert wrong.get("/v1/collections").status_code == 401  # a wrong key is wrong, open read or not
    with limited_server.client(keys.limited) as limited:
        assert limited.get("/v1/collections/shapes").status_code == 404  # a key keeps its own limits


def test_cors_answers_only_the_configured_origin(limited_server: Server, server: Server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    with limited_server.client() as client:
        allowed = client.options("/v1/search", headers={**preflight, "Access-Control-Request-Headers": "x-api-key"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        other = client.options("/v1/search", headers={**preflight, "Origin": "https://evil.example.test"})
        assert "access-control-allow-origin" not in other.headers
    with server.client() as client:  # no origins configured: no CORS at all
        response = client.get("/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in response.headers


@pytest.fixture(scope="module")
def keyless_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """In process: no key configured, open read off, models not preloaded (no route here gets that far)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("keyless") / "data", api_preload=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_with_no_key_configured_every_protected_route_is_401(keyless_app: TestClient) -> None:
    schema = keyless_app.get("/openapi.json").json()
    checked = 0
    for path, operations in schema["paths"].items():
        for method in operations:
            concrete = path.replace("{name}", "shapes").replace("{image_id}", "ab" * 32).replace("{job_id}", "j1")
            response = keyless_app.request(method.upper(), concrete, headers={})
            if path in ("/healthz", "/readyz", "/metrics"):
                assert response.status_code in (200, 503), (method, path)  # readyz: no model preloaded yet
                continue
            assert response.status_code == 401, (method, path, response.text)
            assert "vlsearch keys create" in error_of(response)["message"]
            checked += 1
    assert checked >= 17


def test_dependencies_can_be_overridden(keyless_app: TestClient) -> None:
    app = keyless_app.app
    app.dependency_overrides[read_access] = lambda: Principal(None, "test")  # type: ignore[attr-defined]
    try:
        response = keyless_app.get("/v1/collections")
        assert response.status_code == 200 and response.json() == {"collections": [], "default": None}
    finally:
        app.dependency_overrides.clear()  # type: ignore[attr-defined]


def test_the_limiter_counts_in_process_when_redis_is_unreachable(tmp_path: Path) -> None:
    limiter = RateLimiter(limit=2, window=60, redis_url="redis://127.0.0.1:1/0")
    limiter.check("k")
    limiter.check("k")
    with pytest.raises(Exception, match="VLSEARCH_RATE_LIMIT") as raised:
        limiter.check("k")
    assert raised.value.status_code == 429 and 1 <= int(raised.value.headers["Retry-After"]) <= 60  # type: ignore[attr-defined]
    limiter.check("another key")
    assert RateLimiter(limit=0, window=60).enabled is False


def test_serve_refuses_a_setting_that_cannot_work_in_one_line() -> None:
    from typer.testing import CliRunner

    from cli.main import app as cli

    result = CliRunner().invoke(cli, ["serve", "--port", "1"], env={"VLSEARCH_RATE_LIMIT": "-1"})
    assert result.exit_code == 1 and "VLSEARCH_RATE_LIMIT" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_metrics_can_be_closed_to_callers_without_a_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_preload=False, metrics_open=False)
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
        assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
        assert client.get("/healthz").status_code == 200


def test_an_unexpected_failure_is_a_generic_500_without_a_trace(keyless_app: TestClient) -> None:
    def broken() -> Principal:
        raise RuntimeError("secret internals /etc/vlsearch")

    app = keyless_app.app
    app.dependency_overrides[read_access] = broken  # type: ignore[attr-defined]
    try:
        response = keyless_app.get("/v1/collections")
    finally:
        app.dependency_overrides.clear()  # type: ignore[attr-defined]
    assert response.status_code == 500
    assert error_of(response) == {"code": "internal_error", "message": "internal server error (logged on the server)"}
    assert "secret internals" not in response.text
