"""POST /v1/search (text, stored image or both), /v1/search/image (an upload), /v1/search/url (an image URL)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Form
from fastapi.responses import Response

from api.deps import FetcherDep, MetricsDep, ReadAccess, ServiceDep, SettingsDep, visible
from api.json_body import JsonRoute
from api.metrics import Metrics
from api.schemas import (
    EncoderOut,
    ErrorResponse,
    GenerativeModelOut,
    HitOut,
    ImageSearchForm,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    UrlSearchRequest,
    json_response,
    validated,
)
from core.service import InvalidQuery, Service
from core.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}
router = APIRouter(prefix="/v1", tags=["search"], responses=ERRORS, route_class=JsonRoute)


def check_bounds(options: SearchOptions, settings: Settings) -> None:
    """The API's limits on top of the service's own checks; each message names its setting."""
    if options.k > settings.api_max_k:
        raise InvalidQuery(f"k must be at most {settings.api_max_k} (VLSEARCH_API_MAX_K), got {options.k}")
    if options.offset > settings.api_max_offset:
        raise InvalidQuery(
            f"offset must be at most {settings.api_max_offset} (VLSEARCH_API_MAX_OFFSET), got {options.offset}"
        )
    if options.rerank_k is not None and options.rerank_k > settings.api_max_rerank_k:
        raise InvalidQuery(
            f"rerank_k must be at most {settings.api_max_rerank_k} (VLSEARCH_API_MAX_RERANK_K), got {options.rerank_k}"
        )


def run_search(
    service: Service,
    settings: Settings,
    metrics: Metrics,
    options: SearchOptions,
    collection: str,
    started: float,
    **image: Any,
) -> Response:
    """One search through the service, answered with the collection's encoder and the generative model used."""
    check_bounds(options, settings)
    query = options.query(settings.rerank_k, settings.fusion_weight, **image)
    result = service.search(query, collection)
    took = time.perf_counter() - started
    metrics.observe_search(query.mode, query.reranks, query.captions, took)
    manifest = service.store(collection).manifest
    identity = result.caption_model or (service.container.vlm().identity if query.reranks else None)
    answer = SearchResponse(
        collection=result.collection,
        hits=[HitOut.of(hit, result.collection) for hit in result.hits],
        encoder=EncoderOut(
            name=manifest.encoder, weights=manifest.weights, pretrained=manifest.pretrained, dim=manifest.dim
        ),
        generative_model=GenerativeModelOut(source=settings.vlm_model, identity=identity),
        took_ms=round(took * 1000, 3),
    )
    return json_response(answer)


@router.post("/search", response_model=SearchResponse, summary="Search by text, a stored image, or both")
def search(
    body: SearchRequest, principal: ReadAccess, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    started = time.perf_counter()
    collection = visible(principal, body.collection or settings.collection)
    image = {"image_id": body.image_id} if body.image_id else {}
    return run_search(service, settings, metrics, body, collection, started, **image)


def _options(form: ImageSearchForm) -> SearchOptions:
    """The options of a multipart search: the `options` JSON object, then the fields given on their own."""
    given = form.model_dump(exclude_unset=True, exclude={"options", "file"})
    return validated(SearchOptions, {**(form.options or {}), **given}, "options")


@router.post(
    "/search/image",
    response_model=SearchResponse,
    summary="Search by an uploaded image (multipart), with optional text",
)
def search_image(
    form: Annotated[ImageSearchForm, Form(media_type="multipart/form-data")],
    principal: ReadAccess,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    started = time.perf_counter()
    options = _options(form)
    collection = visible(principal, options.collection or settings.collection)
    data = form.file.file.read(settings.max_image_bytes + 1)
    picture = service.query_image(data)  # the decoder's byte and pixel limits: ImageTooLarge is a 413
    return run_search(service, settings, metrics, options, collection, started, **picture.fields())


@router.post(
    "/search/url", response_model=SearchResponse, summary="Search by the image at a URL (public addresses only)"
)
def search_url(
    body: UrlSearchRequest,
    principal: ReadAccess,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    fetcher: FetcherDep,
) -> Response:
    started = time.perf_counter()
    collection = visible(principal, body.collection or settings.collection)
    fetched = fetcher.fetch(body.url)  # FetchRefused (400) before any connection to a non-public address
    picture = service.query_image(fetched.data)
    options = SearchOptions.model_validate(body.model_dump(exclude={"url"}))
    return run_search(service, settings, metrics, options, collection, started, **picture.fields())
