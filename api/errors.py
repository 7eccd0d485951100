"""Every error the API answers, as JSON `{"error": {"code": "...", "message": "..."}}` with the right status.

The library's errors carry a category (indexer/errors.py); this is the one place that maps it to a status. The
framework's own errors (404 for an unknown route, 405, 422 for a request that does not validate) get the same
shape; anything unexpected is logged and answered 500 with a generic message, never a stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import ErrorCategory, VlsearchError
from retriever.errors import CollectionNotFound

log = logging.getLogger("vlsearch.api")

CATEGORY_STATUS: dict[ErrorCategory, int] = {
    "invalid_input": 400,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "unavailable": 503,
}
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    503: "unavailable",
}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_PATH_PARAMETER = re.compile(r"\\\{[^}]+\\\}")
_COLLECTION_NAME = re.compile(r"^no collection ('(?:[^'\\]|\\.)*'|\"[^\"]*\")")


class ApiError(StarletteHTTPException):
    """An error raised by the API layer itself (auth, limits), with its own code."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers) if headers else None)
        self.code = code


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, **extra}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers) if headers else None)


def error_code(error: VlsearchError) -> str:
    """The snake-case name of the error's class: `CollectionNotFound` -> `collection_not_found`."""
    return _CAMEL.sub("_", type(error).__name__).lower()


def public_message(error: VlsearchError) -> str:
    """The message a client sees: one line. A missing collection is named without the server's data folder, so
    that a collection a key may not see reads exactly like one that does not exist."""
    message = " ".join(str(error).split())
    if isinstance(error, CollectionNotFound) and (found := _COLLECTION_NAME.match(message)):
        return f"no collection {found.group(1)}"
    return message


def status_of(error: VlsearchError) -> int:
    return CATEGORY_STATUS.get(error.category, 400)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors()[:5]:
        if problem.get("type") == "json_invalid" and "error" in problem.get("ctx", {}):  # FastAPI's own JSON 422
            parts.append(f"invalid JSON: {problem['ctx']['error']}")
            continue
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        parts.append(f"{where}: {problem.get('msg', 'invalid')}" if where else str(problem.get("msg", "invalid")))
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "") or "invalid request"


async def _library_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, VlsearchError)
    status = status_of(error)
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(error).__name__, error)
    return error_response(status, error_code(error), public_message(error))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = getattr(error, "code", None) or STATUS_CODES.get(error.status_code, f"http_{error.status_code}")
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    headers = dict(error.headers or {})
    if error.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif error.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        if allowed := allowed_methods(request):
            headers["Allow"] = ", ".join(allowed)
    elif error.status_code == 413 and message == "Content Too Large":
        message = "the request body is larger than the upload limit (VLSEARCH_MAX_UPLOAD_BYTES)"
    return error_response(error.status_code, code, message, headers)


@lru_cache(maxsize=256)
def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + _PATH_PARAMETER.sub("[^/]+", re.escape(path)) + "$")


def allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI schema lists for the request's path: Starlette's 405 names those of the first route
    that matched the path only, one method each in FastAPI."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    methods: set[str] = set()
    for template, operations in paths.items():
        if _template(template).match(request.url.path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(422, "invalid_request", _validation_message(error))


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return error_response(500, "internal_error", "internal server error (logged on the server)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(VlsearchError, _library_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
