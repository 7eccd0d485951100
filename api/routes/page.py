"""The web page: `/` is `api/static/index.html`, `/static/*` its style sheet and JavaScript modules (no build step,
nothing from a CDN). The page calls only the public API below, with the key its user enters, so a script can do
whatever it does; it is served without a key (it holds no data) and left out of the OpenAPI schema."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.staticfiles import PathLike
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent.parent / "static"

# The page's own files only: no inline script, no other origin; thumbnails arrive as blob: URLs (fetched with the
# key header, which an <img src> cannot send).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page and modules arrive together
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


class PageFiles(StaticFiles):
    """api/static/, with the page's headers on every file."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_page(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", PageFiles(directory=STATIC), name="static")
