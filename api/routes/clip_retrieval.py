"""clip-retrieval's back-end API, so that its `ClipClient` and its front end work against vlsearch unchanged:
POST /knn-service, POST /metadata, GET /indices-list, and GET /config.json (what the front end reads first).

The bodies are JSON read from the raw request whatever its Content-Type: ClipClient posts `json.dumps(body)` with
none, the front end's `fetch` sends text/plain, and a Pydantic body parameter would refuse both. How clip-retrieval's
fields map onto vlsearch:

- `indice_name` is the collection (default VLSEARCH_COLLECTION); /indices-list lists the caller's collections.
- One query part is used, in clip-retrieval's order: `text`, else `image` (base64 of the file's bytes), else
  `image_url` (through the safe fetcher, as /v1/search/url), else `embedding_input` (a vector of the collection's
  encoder: a raw vector cannot be checked against the encoder, only its dim). Text and image queries run exactly
  as /v1/search runs them, so the same query gets the same ids in the same order.
- `modality`: clip-retrieval keeps an image index and a caption index; vlsearch indexes images only, so both
  `image` and `text` search the image embeddings (the same answer).
- `num_result_ids` (default `num_images`) results, capped at VLSEARCH_API_MAX_K (the front end asks for 3000);
  the first `num_images` carry metadata, the rest only id and similarity (the front end asks /metadata for them).
- `deduplicate`: accepted; exact copies are one image already (ids are content hashes), near-duplicates stay.
- `use_mclip`, `aesthetic_score`, `aesthetic_weight` (`""`, a numeric string or a number), `use_safety_model`,
  `use_violence_detector`: accepted and ignored (vlsearch has no multilingual text tower, aesthetic embeddings,
  safety or violence models). Unknown fields are ignored, as clip-retrieval does.
- `id` is vlsearch's image id (hex of its content hash, stable across re-indexing), not clip-retrieval's row number:
  neither ClipClient nor the front end does arithmetic on ids, they only send them back to /metadata.
- Metadata: `url` (for images indexed from a URL), `image_path` (the first path on the server), `caption` (the first
  cached caption; none is generated here), `image` (base64 of a JPEG thumbnail, for images without a `url`, as
  clip-retrieval sends images it has on disk: what the front end shows). Absent fields are left out, not null.

Auth is /v1/search's (a read key), with `?key=<key>` accepted too on these routes only, since ClipClient users put
the key in the URL. The front end sends no key: it needs VLSEARCH_OPEN_READ=true (or a proxy adding the header),
and VLSEARCH_CORS_ORIGINS when it is served from another origin.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import Base64Bytes, BaseModel, BeforeValidator, ConfigDict, Field

from api.deps import FetcherDep, MetricsDep, QueryKeyReadAccess, ServiceDep, SettingsDep, visible
from api.json_body import JsonRoute, parse_json
from api.routes.search import ERRORS
from api.schemas import MAX_TEXT, ImageId, validated
from core.service import HitView, InvalidQuery, Query, SearchResult, Service
from indexer.errors import DecodeError
from indexer.fetch import SafeFetcher
from retriever.store import Hit

router = APIRouter(tags=["clip-retrieval"], responses=ERRORS, route_class=JsonRoute)

THUMBNAIL_SIDE = 256  # the `image` of a result: enough for the front end's grid
MAX_EMBEDDING = 8192  # numbers in embedding_input
MAX_METADATA_IDS = 1000
_Model = TypeVar("_Model", bound=BaseModel)


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


Blank = BeforeValidator(_blank_is_none)  # the front end sends "" for a field it leaves empty


class ClipBody(BaseModel):
    # extra: as clip-retrieval's back end, its clients may send more; no NaN or infinity (api.schemas.Strict)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class KnnRequest(ClipBody):
    """A clip-retrieval knn query (the module docstring says how each field maps onto vlsearch)."""

    text: Annotated[str | None, Blank] = Field(default=None, max_length=MAX_TEXT, description="What to look for.")
    image: Annotated[Base64Bytes | None, Blank] = Field(default=None, description="base64 of an image file's bytes.")
    image_url: Annotated[str | None, Blank] = Field(
        default=None, max_length=4096, description="http(s) URL of an image (public addresses only)."
    )
    embedding_input: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_EMBEDDING,
        description="A query vector from the collection's encoder.",
    )
    modality: Literal["image", "text"] = Field(
        default="image", description="Both search the image embeddings: vlsearch indexes images only."
    )
    indice_name: Annotated[str | None, Blank] = Field(
        default=None, max_length=200, description="The collection (default: VLSEARCH_COLLECTION)."
    )
    num_images: int = Field(default=40, ge=1, description="How many of the results carry metadata.")
    num_result_ids: int | None = Field(
        default=None, ge=1, description="How many results (default num_images; at most VLSEARCH_API_MAX_K)."
    )
    deduplicate: bool = Field(default=True, description="Accepted: exact copies are one image already.")
    use_mclip: bool = Field(default=False, description="Accepted, ignored: the collection's encoder embeds text.")
    aesthetic_score: Annotated[float | None, Blank] = Field(default=None, description="Accepted, ignored.")
    aesthetic_weight: Annotated[float | None, Blank] = Field(default=None, description="Accepted, ignored.")
    use_safety_model: bool = Field(default=False, description="Accepted, ignored: no safety model.")
    use_violence_detector: bool = Field(default=False, description="Accepted, ignored: no violence detector.")


class MetadataRequest(ClipBody):
    ids: list[ImageId] = Field(max_length=MAX_METADATA_IDS, description="Ids from /knn-service.")
    indice_name: Annotated[str | None, Blank] = Field(
        default=None, max_length=200, description="The collection (default: VLSEARCH_COLLECTION)."
    )


class ClipMetadata(BaseModel):
    url: str | None = Field(default=None, description="The URL the image was indexed from.")
    image_path: str | None = Field(default=None, description="The image's first path on the server.")
    caption: str | None = Field(default=None, description="A cached caption of the generative model.")
    image: str | None = Field(default=None, description="base64 of a JPEG thumbnail (images without a url).")


class KnnResult(ClipMetadata):
    """One result; fields without a value are left out (the front end tests them for undefined, not null)."""

    id: str = Field(description="vlsearch's image id (hex of its content hash), as /metadata and /v1 take it.")
    similarity: float = Field(description="Cosine similarity of the CLIP embeddings.")


class MetadataResult(BaseModel):
    id: str
    metadata: ClipMetadata


class FrontConfig(BaseModel):
    """What clip-retrieval's front end reads from config.json before anything else (its field names)."""

    defaultBackend: str = Field(description="This server's URL.")
    defaultIndex: str = Field(description="The default collection, when the caller may see it; else empty.")
    urlColumn: str = Field(description="The result field holding an image's URL.")


def _parse(model: type[_Model], raw: bytes) -> _Model:
    """The body as model, whatever the Content-Type; a body that is not JSON or not the model is a 422."""
    return validated(model, parse_json(raw))


async def knn_body(request: Request) -> KnnRequest:
    return _parse(KnnRequest, await request.body())


async def metadata_body(request: Request) -> MetadataRequest:
    return _parse(MetadataRequest, await request.body())


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The request body in the schema, since the route reads it raw: JSON under any Content-Type."""
    content = {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
    return {
        "requestBody": {
            "required": True,
            "description": "JSON, with any Content-Type or none (ClipClient sends none, the front end text/plain).",
            "content": {"application/json": content, "text/plain": content},
        }
    }


def clip_metadata(hit: HitView, service: Service, collection: str) -> ClipMetadata:
    """clip-retrieval's metadata of a result: its URL or path, a cached caption, a thumbnail when it has no URL."""
    source = hit.source_name or ""
    url = source if source.startswith(("http://", "https://")) else None
    image = None
    if url is None:
        with contextlib.suppress(DecodeError):  # its file is gone or changed: the result stays, without a picture
            image = base64.b64encode(service.thumbnail(hit.id, THUMBNAIL_SIDE, collection).data).decode("ascii")
    caption = next(iter(hit.captions.values()), None)
    return ClipMetadata(url=url, image_path=hit.path, caption=caption, image=image)


def _query_result(body: KnnRequest, service: Service, fetcher: SafeFetcher, collection: str, k: int) -> SearchResult:
    """The search of the first query part given, in clip-retrieval's order; text and images as /v1/search runs them."""
    if body.text:
        return service.search(Query(text=body.text, k=k), collection)
    if body.image is not None or body.image_url:
        data = body.image if body.image is not None else fetcher.fetch(body.image_url or "").data
        picture = service.query_image(data)  # the decoder's byte and pixel limits: ImageTooLarge is a 413
        return service.search(Query(k=k, **picture.fields()), collection)
    if body.embedding_input is not None:
        return service.search_vector(body.embedding_input, collection, k=k)
    raise InvalidQuery("a query needs one of text, image, image_url or embedding_input")


@router.post(
    "/knn-service",
    summary="clip-retrieval: nearest images of a text, an image, an image URL or an embedding",
    response_model_exclude_none=True,
    openapi_extra=_body_doc(KnnRequest),
)
def knn_service(
    principal: QueryKeyReadAccess,
    body: Annotated[KnnRequest, Depends(knn_body)],
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    fetcher: FetcherDep,
) -> list[KnnResult]:
    """clip-retrieval's knn query, answered as a list of `{id, similarity, url or image_path, caption, image}`.

    The API key goes in `Authorization: Bearer`, `X-API-Key` or, on the clip-retrieval routes only, `?key=<key>`
    (`ClipClient("https://host/knn-service?key=...", ...)`). Fields: `text`, `image` (base64), `image_url` and
    `embedding_input` (the first given is the query); `indice_name` (the collection); `num_result_ids` results (at
    most VLSEARCH_API_MAX_K), the first `num_images` with metadata. Both modalities search the image embeddings;
    `deduplicate` needs nothing more (copies are one image); `use_mclip`, `aesthetic_score`, `aesthetic_weight`,
    `use_safety_model` and `use_violence_detector` are accepted and ignored.
    """
    started = time.perf_counter()
    collection = visible(principal, body.indice_name or settings.collection)
    k = min(body.num_result_ids or body.num_images, settings.api_max_k)
    result = _query_result(body, service, fetcher, collection, k)
    metrics.observe_search("clip", False, False, time.perf_counter() - started)
    return [
        KnnResult(
            id=hit.id,
            similarity=hit.score,
            **(clip_metadata(hit, service, collection).model_dump() if rank < body.num_images else {}),
        )
        for rank, hit in enumerate(result.hits)
    ]


@router.post(
    "/metadata",
    summary="clip-retrieval: the metadata of results by id",
    response_model_exclude_none=True,
    openapi_extra=_body_doc(MetadataRequest),
)
def metadata(
    principal: QueryKeyReadAccess,
    body: Annotated[MetadataRequest, Depends(metadata_body)],
    service: ServiceDep,
    settings: SettingsDep,
) -> list[MetadataResult]:
    """`{id, metadata}` of each id the collection holds, in the order asked (ids it does not hold are left out).

    The API key goes in `Authorization: Bearer`, `X-API-Key` or, on the clip-retrieval routes only, `?key=<key>`.
    """
    collection = visible(principal, body.indice_name or settings.collection)
    records = service.store(collection).get(list(dict.fromkeys(body.ids)))
    views = [HitView.of(Hit(id=record.id, score=0.0, payload=record.payload)) for record in records]
    return [MetadataResult(id=view.id, metadata=clip_metadata(view, service, collection)) for view in views]


@router.get("/indices-list", summary="clip-retrieval: the collections the caller may search")
def indices_list(principal: QueryKeyReadAccess, service: ServiceDep) -> list[str]:
    """The names of the collections this key may read (`indice_name` in the other clip-retrieval routes).

    The API key goes in `Authorization: Bearer`, `X-API-Key` or, on the clip-retrieval routes only, `?key=<key>`.
    """
    return [name for name in service.list_collections() if principal.may_access(name)]


@router.get("/config.json", summary="clip-retrieval's front end: its back end (this server) and default index")
def front_config(request: Request, principal: QueryKeyReadAccess, settings: SettingsDep) -> FrontConfig:
    """What clip-retrieval's front end reads first: this server as its back end, and the default collection.

    The API key goes in `Authorization: Bearer`, `X-API-Key` or, on the clip-retrieval routes only, `?key=<key>`.
    The front end itself sends no key: serve it against VLSEARCH_OPEN_READ=true.
    """
    default = settings.collection if principal.may_access(settings.collection) else ""
    return FrontConfig(defaultBackend=str(request.base_url).rstrip("/"), defaultIndex=default, urlColumn="url")
