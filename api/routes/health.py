"""GET /healthz (the process answers), /readyz (models, store, Redis), /metrics (Prometheus). No key needed for
the first two; /metrics is open unless VLSEARCH_METRICS_OPEN=false (it holds route templates, no names or ids)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import StateDep, metrics_access
from api.errors import error_body
from api.readiness import Warmup, failing, readiness
from api.schemas import ErrorResponse, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Ready to serve: models loaded, store open, Redis reachable when jobs are configured",
    response_model=Ready,
    responses={503: {"model": ErrorResponse, "description": "Not ready; the message names the failing part."}},
)
def readyz(request: Request, state: StateDep) -> Any:
    warmup: Warmup = request.app.state.warmup
    checks = readiness(state, warmup)
    parts = failing(checks)
    if parts:
        message = "; ".join(f"{part}: {checks[part]}" for part in parts)
        return JSONResponse(error_body("not_ready", message, checks=checks), status_code=503)
    return Ready(status="ready", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "The text exposition format."}},
)
def metrics(state: StateDep, _: Annotated[Any, Depends(metrics_access)]) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
