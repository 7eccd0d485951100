"""Readiness: the models loaded at start-up (in a thread, so /healthz answers at once), the store answering, and
Redis reachable when jobs are configured. /readyz reports each part and names the one that fails."""

from __future__ import annotations

import logging
import threading
import time

import redis

from api.deps import AppState, jobs_configured

log = logging.getLogger("vlsearch.api")


class Warmup:
    """Loads the settings' encoder and generative model once, in a thread of its own; its state is for /readyz."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: str | None = None
        self.done = False
        self.seconds: float | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vlsearch-warmup", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        service = self._state.service
        try:
            service.container.encoder().load()
            service.container.vlm()
            if service.settings.collection in service.list_collections():
                service.store(service.settings.collection)
        except Exception as error:
            self.error = f"{type(error).__name__}: {' '.join(str(error).split())}"
            log.error("models could not be loaded: %s", self.error)
        self.seconds = time.perf_counter() - started
        self.done = True

    def status(self) -> str:
        if not self.done:
            self.start()  # with VLSEARCH_API_PRELOAD=false, the first readiness check loads them
            return "loading"
        return self.error or "ok"


def check_store(state: AppState) -> str:
    try:
        state.service.list_collections()
    except Exception as error:
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return "ok"


def check_redis(state: AppState) -> str:
    if not jobs_configured(state.settings):
        return "not configured"
    try:
        client = redis.Redis.from_url(state.settings.redis_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as error:
        return f"not reachable (VLSEARCH_REDIS_URL): {error}"
    return "ok"


def check_keys(state: AppState) -> str:
    try:
        return "ok" if state.keys.configured else NO_KEYS
    except Exception as error:
        return f"{type(error).__name__}: {error}"


NO_KEYS = "none configured (every protected route answers 401)"


def readiness(state: AppState, warmup: Warmup) -> dict[str, str]:
    return {
        "models": warmup.status(),
        "store": check_store(state),
        "redis": check_redis(state),
        "keys": check_keys(state),
    }


def failing(checks: dict[str, str]) -> list[str]:
    """The parts that keep the server from being ready (no key configured is a state, not a failure)."""
    return [part for part, status in checks.items() if status not in ("ok", "not configured", NO_KEYS)]
