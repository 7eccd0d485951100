"""The OpenAPI schema validates, and every route in it was called by some test of this package (runs last)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from tests.api.conftest import CALLS, Server

HERE = Path(__file__).parent


def _schema(server: Server) -> dict:
    with httpx.Client(base_url=server.base_url) as client:
        return client.get("/openapi.json").json()  # type: ignore[no-any-return]


def test_the_openapi_schema_validates(server: Server) -> None:
    schema = _schema(server)
    validate(schema)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path not in ("/healthz", "/readyz", "/metrics"):
                assert "401" in operation["responses"] and "422" in operation["responses"], (method, path)


def test_every_route_in_the_schema_was_called(server: Server, request: pytest.FixtureRequest) -> None:
    modules = {Path(str(item.fspath)).name for item in request.session.items}
    expected = {path.name for path in HERE.glob("test_*.py")}
    if not expected <= modules:
        pytest.skip(f"only part of tests/api ran ({', '.join(sorted(modules & expected))})")
    missing = []
    for path, operations in _schema(server)["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
        for method in operations:
            if not any(m == method.upper() and pattern.match(p) for m, p in CALLS):
                missing.append(f"{method.upper()} {path}")
    assert not missing, f"routes no test called: {missing}"
