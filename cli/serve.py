"""`vlsearch serve`: the HTTP API (api.app:create_app) under uvicorn."""

from __future__ import annotations

import copy
from typing import Annotated, Any

import typer

from cli.main import app, reports_errors
from core.container import build_settings

APP_FACTORY = "api.app:create_app"


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus vlsearch's own API log (errors answered 500, Redis fallbacks) on its handler; given
    to uvicorn so that every worker process configures it."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["vlsearch"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


@app.command()
@reports_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (each loads its own models).")] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve the HTTP API (settings from VLSEARCH_ variables; docs at /docs, schema at /openapi.json)."""
    import uvicorn

    from api.http_protocol import PROTOCOL

    build_settings()  # a setting that cannot work is one line here, not a traceback in every worker
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        http=PROTOCOL,  # httptools with a bounded request head and a deadline for it, refusals in JSON
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=access_log,
    )
