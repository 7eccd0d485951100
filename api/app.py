"""The FastAPI app: `create_app(settings)` (uvicorn: `api.app:create_app --factory`, or `vlsearch serve`).

The service (stores, models) is built once per process in the lifespan and shared by every request; the models
load in a thread at start-up, so /healthz answers at once and /readyz once they are in. Blocking model and store
work runs in the thread pool (plain `def` routes), never on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, jobs_configured
from api.errors import install_error_handlers
from api.limits import BodyLimitMiddleware
from api.metrics import JOBS_SCANNED, Metrics, MetricsMiddleware
from api.readiness import Warmup
from api.routes import ask, clip_retrieval, collections, health, images, jobs, search
from api.routes.page import install_page
from core.container import build_settings
from core.keys import KeyStore
from core.service import Service
from core.settings import Settings

API_VERSION = "1"
DESCRIPTION = """Image search over vlsearch collections: text, image and URL queries, similar images, thumbnails,
questions to the generative model, and jobs on the workers.

Authentication: an API key in `Authorization: Bearer <key>` or `X-API-Key: <key>` (create one with
`vlsearch keys create`). Read routes need the `read` scope, jobs, deletes and collection changes `write`.
Every error is `{"error": {"code": "...", "message": "..."}}`."""


def _redis_client(settings: Settings) -> object:
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=2)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app on settings (default: the environment's; InvalidSetting names a variable that cannot work)."""
    settings = settings or build_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.api_torch_threads:
            import torch

            torch.set_num_threads(settings.api_torch_threads)  # before any model runs (see the setting)
        service = Service(settings)
        state = AppState(settings, service, KeyStore.from_settings(settings), metrics)
        app.state.vlsearch = state
        app.state.warmup = warmup = Warmup(state)
        if settings.api_preload:
            warmup.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="vlsearch",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (search, collections, images, jobs, ask, health, clip_retrieval):
        app.include_router(module.router)
    install_page(app)

    if jobs_configured(settings):
        from workers.app import QUEUES

        client = _redis_client(settings)

        def job_states() -> list[str]:
            return [record.state for record in app.state.vlsearch.jobs().list(JOBS_SCANNED)]

        metrics.watch_jobs(lambda: client, QUEUES, job_states)

    # Added innermost first: metrics see every answer (413s and CORS preflights included).
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes, timeout=settings.request_timeout)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
