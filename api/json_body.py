"""How the API reads a JSON request body: one parser for every route, declared bodies and raw ones alike.

The standard library's `json.loads` recurses on the C stack (a body nested 10,000 deep ends in RecursionError, a
500) and lets unpaired surrogates through (`"\\ud800"`, which later fails to encode in SQLite or Redis). pydantic-core's
parser (jiter) has neither problem: it stops at a fixed nesting depth and refuses text that is not Unicode, so a
body it cannot read is a 422 like any other malformed JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import from_json

MAX_JSON_DEPTH = 200  # jiter's limit: deeper bodies are refused ("recursion limit exceeded")


def parse_json(raw: bytes) -> Any:
    """raw as JSON; RequestValidationError (a 422) when it is not JSON, is nested deeper than MAX_JSON_DEPTH or
    holds text that is not Unicode. For routes that read their body themselves."""
    try:
        return from_json(raw)
    except ValueError as error:
        problem = {"type": "json_invalid", "loc": ("body",), "msg": f"invalid JSON: {error}", "input": None}
        raise RequestValidationError([problem]) from None


class JsonRequest(Request):
    """A request whose `json()` is parse_json's. FastAPI turns the JSONDecodeError into its own 422."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = from_json(await self.body())
            except ValueError as error:
                raise json.JSONDecodeError(str(error), "", 0) from None
        return self._json


class JsonRoute(APIRoute):
    """An API route that hands its handler a JsonRequest: `APIRouter(route_class=JsonRoute)`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def json_handler(request: Request) -> Response:
            return await handler(JsonRequest(request.scope, request.receive))

        return json_handler
