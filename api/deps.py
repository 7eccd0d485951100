"""What routes get through `Annotated[..., Depends(...)]`: the service, settings, jobs, the fetcher, and who is
asking (API key, scope, collections, rate limit). Tests replace any of them with `app.dependency_overrides`.

Auth: the key comes in `Authorization: Bearer <key>` or `X-API-Key: <key>` (on the clip-retrieval routes also in
`?key=<key>`). No key or a wrong one is 401, a key without the route's scope 403; a key limited to some collections
gets 404 for any other, as if it were absent.
With no key configured every protected route answers 401, unless VLSEARCH_OPEN_READ=true opens the read routes
(anonymous callers are rate-limited per client address).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.limits import RateLimiter
from api.metrics import Metrics
from core.keys import ApiKey, KeyStore, Scope
from core.service import Service
from core.settings import Settings
from indexer.errors import StoreUnavailable
from indexer.fetch import SafeFetcher
from retriever.errors import CollectionNotFound

if TYPE_CHECKING:
    from workers.api import Jobs

JOBS_SETTING = "VLSEARCH_REDIS_URL"


def jobs_configured(settings: Settings) -> bool:
    """Jobs (and the Redis checks) are on when the Redis URL is set explicitly, not left at its default."""
    return "redis_url" in settings.model_fields_set


class AppState:
    """What one app builds once at start-up (lifespan) and every request shares."""

    def __init__(self, settings: Settings, service: Service, keys: KeyStore, metrics: Metrics) -> None:
        self.settings = settings
        self.service = service
        self.keys = keys
        self.metrics = metrics
        self.fetcher = service.container.fetcher(total_timeout=30.0)  # a request waits 30 s at most for its URL
        self.limiter = RateLimiter(
            settings.rate_limit, settings.rate_limit_window, settings.redis_url if jobs_configured(settings) else None
        )
        self._jobs: Jobs | None = None
        self._lock = threading.Lock()

    def jobs(self) -> Jobs:
        """The jobs API, built on first use (Celery is imported only then)."""
        if not jobs_configured(self.settings):
            raise StoreUnavailable(f"jobs are not configured on this server: set {JOBS_SETTING}")
        with self._lock:
            if self._jobs is None:
                from workers.api import Jobs

                self._jobs = Jobs(self.settings)
            return self._jobs


async def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.vlsearch
    return state


StateDep = Annotated[AppState, Depends(app_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_service(state: StateDep) -> Service:
    return state.service


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_fetcher(state: StateDep) -> SafeFetcher:
    return state.fetcher


def get_jobs(state: StateDep) -> Jobs:
    return state.jobs()


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
FetcherDep = Annotated[SafeFetcher, Depends(get_fetcher)]
if TYPE_CHECKING:
    JobsDep = Annotated[Jobs, Depends(get_jobs)]
else:  # workers.api (and Celery) are imported on first use, not with the app
    JobsDep = Annotated[Any, Depends(get_jobs)]


# --- who is asking ---------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key: `X-API-Key: <key>`.")


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, or nobody (key None) where VLSEARCH_OPEN_READ lets anonymous callers read."""

    key: ApiKey | None
    client: str

    @property
    def id(self) -> str:
        return f"key:{self.key.id}" if self.key is not None else f"anonymous:{self.client}"

    def may_access(self, collection: str) -> bool:
        return self.key is None or self.key.may_access(collection)


def visible(principal: Principal, collection: str) -> str:
    """collection, if the caller may see it; else the same 404 a missing collection gets."""
    if not principal.may_access(collection):
        raise CollectionNotFound(f"no collection {collection!r}")
    return collection


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="vlsearch"'})


def authenticate(
    request: Request,
    state: AppState,
    scope: Scope,
    bearer: HTTPAuthorizationCredentials | None,
    header: str | None,
) -> Principal:
    """The caller of a route that needs scope, counted against the rate limit (see the module docstring)."""
    secret = header or (bearer.credentials if bearer is not None else None)
    client = request.client.host if request.client else "unknown"
    if secret:
        key = state.keys.authenticate(secret)
        if key is None:
            raise _unauthorized("invalid API key")
        if not key.allows(scope):
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope this route needs")
        principal = Principal(key, client)
    elif scope == "read" and state.settings.open_read:
        principal = Principal(None, client)
    elif not state.keys.configured:
        raise _unauthorized("no API key is configured on this server: create one with `vlsearch keys create`")
    else:
        raise _unauthorized("an API key is needed: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    return principal


async def counted(state: AppState, principal: Principal) -> Principal:
    """principal, counted against the rate limit: in the thread pool when the count is kept in Redis (a network
    round trip), else here (a dict under a lock)."""
    if state.limiter.enabled:
        await run_in_threadpool(state.limiter.check, principal.id)
    return principal


async def read_access(
    request: Request,
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    # async: checking a key is a stat of the keys file and a hash, not worth a thread-pool hop per request
    return await counted(state, authenticate(request, state, "read", bearer, header))


async def write_access(
    request: Request,
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    # async: checking a key is a stat of the keys file and a hash, not worth a thread-pool hop per request
    return await counted(state, authenticate(request, state, "write", bearer, header))


ReadAccess = Annotated[Principal, Depends(read_access)]
WriteAccess = Annotated[Principal, Depends(write_access)]

# clip-retrieval's ClipClient can send no header: its users put the key in the URL. Only the clip-retrieval routes
# take it there (a key in a URL ends up in access logs and browser history; the headers are the way elsewhere).
_query_key = APIKeyQuery(
    name="key",
    auto_error=False,
    description="An API key in the query string, `?key=<key>`: on the clip-retrieval routes only.",
)


async def read_access_or_query_key(
    request: Request,
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
    query_key: Annotated[str | None, Depends(_query_key)],
) -> Principal:
    """read_access, with `?key=` as a third place for the key (the headers win when given)."""
    if header is None and bearer is None:
        header = query_key
    return await counted(state, authenticate(request, state, "read", bearer, header))


QueryKeyReadAccess = Annotated[Principal, Depends(read_access_or_query_key)]

CollectionPath = Annotated[str, Path(description="The collection's name.", max_length=200)]


async def readable_collection(name: CollectionPath, principal: ReadAccess) -> str:
    return visible(principal, name)


async def writable_collection(name: CollectionPath, principal: WriteAccess) -> str:
    return visible(principal, name)


ReadCollection = Annotated[str, Depends(readable_collection)]
WriteCollection = Annotated[str, Depends(writable_collection)]


async def metrics_access(request: Request, state: StateDep) -> Any:
    """/metrics: open unless VLSEARCH_METRICS_OPEN=false, then a read key like any read route."""
    if state.settings.metrics_open:
        return None
    bearer = request.headers.get("authorization", "")
    token = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token) if token else None
    return await counted(state, authenticate(request, state, "read", credentials, request.headers.get("x-api-key")))
