"""The page's files as served: no key needed, the page's headers, nothing outside api/static/, not in the schema."""

from __future__ import annotations

import httpx

from tests.web.conftest import Site


def test_the_page_and_its_modules_are_served_without_a_key(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert '<script type="module" src="/static/app.js">' in page.text
        script = client.get("/static/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
        assert "content-security-policy" in script.headers
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_nothing_outside_the_static_folder_is_served(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as client:
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nothing.js"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert answer.headers["content-type"].startswith("application/json"), path  # the API's error shape
        paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)
