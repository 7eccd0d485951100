"""Request and response bodies of the HTTP API (Pydantic), and their conversion to and from the service's values.

Requests refuse unknown fields (a typo such as `tag_any` is a 422, not a filter silently ignored). Bounds that come
from settings (k, offset, rerank_k) are checked by the routes, which know the settings; the static ones are here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator

from core.service import Filter, HitView, Query, SearchMode

COLLECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
IMAGE_ID_PATTERN = r"^[0-9a-f]{8,64}$"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"  # workers.jobs: uuid4().hex
MAX_TEXT = 2000  # characters of a query text or question
MAX_JOB_SOURCES = 10_000  # paths or URLs in one index job
MAX_HISTORY = 50  # earlier turns of a conversation sent with a question

ImageId = Annotated[str, Field(pattern=IMAGE_ID_PATTERN, description="An image id (hex of its content hash).")]


ModelT = TypeVar("ModelT", bound=BaseModel)


def validated(model: type[ModelT], data: Any, *where: str) -> ModelT:
    """data as model, for a body the route reads itself (a form, a raw body): its problems are the framework's own
    422, located under `body` (and `where`), as a body parameter's would be."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = error.errors(include_url=False)
        raise RequestValidationError(
            [{**problem, "loc": ("body", *where, *problem["loc"])} for problem in problems]
        ) from None


def json_response(model: BaseModel) -> Response:
    """model as a JSON answer, serialized by pydantic-core where it is built. Returned by a route that declares the
    model as its `response_model` (the schema); FastAPI's own path would validate the answer a second time, for a
    plain `def` route in one more thread-pool hop (a search's hot path)."""
    return Response(model.model_dump_json(), media_type="application/json")


class Strict(BaseModel):
    """A JSON body: unknown fields refused, and each value of its declared JSON type (no "10" or true for an
    integer, no 0 for a boolean), as the schema says. NaN and infinity pass no bound of their own (min_score has
    none) and are no number a client means. Forms and query strings, all text, convert (FromText)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


FromText = ConfigDict(strict=False)  # the model_config of a form or query string: its values arrive as text


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable: the error class in snake case (collection_not_found, ...).")
    message: str = Field(description="What went wrong, in one line, naming the setting or input to change.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- search ----------------------------------------------------------------------------------------------------


class SearchFilter(Strict):
    """Payload filters, all of which must hold (the CLI's --path-prefix, --tag, --all-tags and size bounds)."""

    path_prefix: str | None = Field(default=None, description="Some path of the image starts with this.")
    tags_any: list[str] = Field(default_factory=list, max_length=100, description="Any of these tags.")
    tags_all: list[str] = Field(default_factory=list, max_length=100, description="All of these tags.")
    min_width: int | None = Field(default=None, ge=0)
    max_width: int | None = Field(default=None, ge=0)
    min_height: int | None = Field(default=None, ge=0)
    max_height: int | None = Field(default=None, ge=0)
    min_bytes: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    taken_after: str | None = Field(
        default=None, max_length=64, description="Taken at or after this ISO 8601 date (midnight) or datetime."
    )
    taken_before: str | None = Field(
        default=None, max_length=64, description="Taken at or before this ISO 8601 date (midnight) or datetime."
    )

    @field_validator("taken_after", "taken_before")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        if value is not None:
            datetime.fromisoformat(value.strip())  # ValueError: a 422 naming the field
        return value

    def to_filter(self) -> Filter | None:
        flt = Filter(
            path_prefix=self.path_prefix,
            tags_any=tuple(self.tags_any),
            tags_all=tuple(self.tags_all),
            min_width=self.min_width,
            max_width=self.max_width,
            min_height=self.min_height,
            max_height=self.max_height,
            min_bytes=self.min_bytes,
            max_bytes=self.max_bytes,
            taken_after=self.taken_after,
            taken_before=self.taken_before,
        )
        return None if flt.is_empty() else flt


class SimilarParams(SearchFilter):
    """The query string of a similar-images request: paging, a score bound and the filter fields."""

    model_config = FromText

    k: int = Field(default=10, ge=1, description="How many results (at most VLSEARCH_API_MAX_K).")
    offset: int = Field(default=0, ge=0, description="Skip this many results (at most VLSEARCH_API_MAX_OFFSET).")
    min_score: float | None = Field(default=None, description="Drop results whose CLIP score is below this.")

    def options(self, collection: str) -> SearchOptions:
        flt = SearchFilter.model_validate(self.model_dump(exclude={"k", "offset", "min_score"}))
        return SearchOptions(collection=collection, k=self.k, offset=self.offset, min_score=self.min_score, filter=flt)


class SearchOptions(Strict):
    """What every search takes besides its image."""

    collection: str | None = Field(default=None, description="Collection to search (default: VLSEARCH_COLLECTION).")
    text: str | None = Field(default=None, max_length=MAX_TEXT, description="What to look for.")
    negative: str | None = Field(default=None, max_length=MAX_TEXT, description="Text to steer away from.")
    text_weight: float = Field(
        default=1.0, ge=-10, le=10, description="Weight of the text when combined with an image."
    )
    image_weight: float = Field(default=1.0, ge=-10, le=10, description="Weight of the image when combined with text.")
    negative_weight: float = Field(default=0.5, ge=0, le=10, description="Weight of the negative text.")
    k: int = Field(default=10, ge=1, description="How many results (at most VLSEARCH_API_MAX_K).")
    offset: int = Field(default=0, ge=0, description="Skip this many results (at most VLSEARCH_API_MAX_OFFSET).")
    filter: SearchFilter | None = None
    min_score: float | None = Field(default=None, description="Drop results whose CLIP score is below this.")
    mode: SearchMode = Field(
        default="clip", description="clip: image content; keyword: words of names, tags, captions."
    )
    rerank: bool = Field(default=False, description="Rescore the top candidates with the generative model.")
    rerank_k: int | None = Field(default=None, ge=1, description="Candidates to rescore (VLSEARCH_RERANK_K).")
    fusion_weight: float | None = Field(default=None, ge=0, le=1, description="1: rerank score alone; 0: CLIP alone.")
    captions: bool = Field(default=False, description="Caption the results with the generative model (cached).")
    min_relevance: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False,
        description='Drop results whose P("Yes") of the generative model is below this (reranks the top rerank_k).',
    )
    sort: Literal["relevance", "date"] = Field(
        default="relevance", description="relevance: by score; date: what passed the bounds, newest taken first."
    )

    def query(self, default_rerank_k: int, default_fusion: float, **image: Any) -> Query:
        return Query(
            text=self.text or None,
            negative=self.negative or None,
            text_weight=self.text_weight,
            image_weight=self.image_weight,
            negative_weight=self.negative_weight,
            k=self.k,
            offset=self.offset,
            min_score=self.min_score,
            filter=self.filter.to_filter() if self.filter else None,
            rerank=self.rerank,
            rerank_k=self.rerank_k if self.rerank_k is not None else default_rerank_k,
            fusion_weight=self.fusion_weight if self.fusion_weight is not None else default_fusion,
            captions=self.captions,
            mode=self.mode,
            min_relevance=self.min_relevance,
            sort=self.sort,
            **image,
        )


class SearchRequest(SearchOptions):
    """A search by text, by a stored image (image_id), or both."""

    image_id: ImageId | None = Field(default=None, description="A stored image of the collection to search with.")


class UrlSearchRequest(SearchOptions):
    """A search by the image at a URL (fetched from public addresses only, VLSEARCH_FETCH_ALLOW for others)."""

    url: str = Field(max_length=4096, description="http(s) URL of an image.")


class ImageSearchForm(SearchOptions):
    """Multipart fields of an image search: the image file, then each option as a field of its own, or all of them
    as one JSON object in `options` (fields given on their own win)."""

    model_config = FromText

    file: UploadFile = Field(description="The image (JPEG, PNG, WebP, ...).")
    options: Json[dict[str, Any]] | None = Field(default=None, description="Every option as one JSON object.")
    filter: Json[SearchFilter] | None = Field(default=None, description="The filter as a JSON object.")  # type: ignore[assignment]


class HitOut(BaseModel):
    id: str
    path: str | None = Field(description="The first of paths.")
    paths: list[str]
    score: float = Field(description="CLIP cosine (clip), BM25 (keyword) or the fused rank score (hybrid).")
    rerank_score: float | None = Field(description="The generative model's score, when reranked.")
    final_score: float | None = Field(description="The score the hits are ordered by, when reranked.")
    relevance: float | None = Field(default=None, description='P("Yes") of the generative model, with min_relevance.')
    caption: str | None = Field(description="This request's generative model's caption, when captions were asked.")
    payload: dict[str, Any] = Field(description="width, height, bytes, format, tags, captions, source_name, taken.")
    thumbnail_url: str
    image_url: str

    @classmethod
    def of(cls, hit: HitView, collection: str) -> HitOut:
        base = f"/v1/collections/{quote(collection, safe='')}/images/{hit.id}"
        return cls(
            id=hit.id,
            path=hit.path,
            paths=hit.paths,
            score=hit.score,
            rerank_score=hit.rerank_score,
            final_score=hit.final_score,
            relevance=hit.relevance,
            caption=hit.caption,
            payload={
                "width": hit.width,
                "height": hit.height,
                "bytes": hit.bytes,
                "format": hit.format,
                "tags": hit.tags,
                "captions": hit.captions,
                "source_name": hit.source_name,
                "taken": hit.taken,
            },
            thumbnail_url=f"{base}/thumbnail",
            image_url=base,
        )


class EncoderOut(BaseModel):
    name: str
    weights: str = Field(description="Identity of the weights: pretrained tag or checksum of the checkpoint.")
    pretrained: str | None
    dim: int


class GenerativeModelOut(BaseModel):
    source: str = Field(description="VLSEARCH_VLM_MODEL: hub id, directory or shipped name.")
    identity: str | None = Field(description="Identity of its weights, when this request used it.")


class SearchResponse(BaseModel):
    collection: str
    hits: list[HitOut]
    encoder: EncoderOut
    generative_model: GenerativeModelOut
    took_ms: float


# --- collections and images -------------------------------------------------------------------------------------


class CollectionCreate(Strict):
    name: str = Field(pattern=COLLECTION_NAME_PATTERN, description="Letters, digits, '-' and '_'.")
    model: str | None = Field(
        default=None,
        description="The encoder: the server's (VLSEARCH_CLIP_MODEL, the default) or a shipped model's name.",
    )


class CollectionList(BaseModel):
    collections: list[str]
    default: str | None = Field(
        description="The server's default collection (VLSEARCH_COLLECTION), when it exists and this key may see it."
    )


class CollectionOut(BaseModel):
    collection: str
    count: int
    manifest: dict[str, Any]


class DropOut(BaseModel):
    collection: str
    dropped: bool


class DeleteOut(BaseModel):
    collection: str
    deleted: int
    count: int


class DuplicateMemberOut(BaseModel):
    id: str
    paths: list[str]
    source_name: str | None


class DuplicateGroupOut(BaseModel):
    members: list[DuplicateMemberOut]


class DuplicatesOut(BaseModel):
    collection: str
    threshold: float
    groups: list[DuplicateGroupOut]


class ImageOut(BaseModel):
    id: str
    collection: str
    paths: list[str]
    payload: dict[str, Any]
    thumbnail_url: str


# --- jobs ------------------------------------------------------------------------------------------------------


class IndexJobCreate(Strict):
    kind: Literal["index"]
    collection: str | None = None
    # An empty path would be the server's working directory, indexed whole.
    paths: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=MAX_JOB_SOURCES, description="Folders (recursive) and files on the server."
    )
    urls: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=MAX_JOB_SOURCES, description="Image URLs."
    )


class TagJobCreate(Strict):
    kind: Literal["tag"]
    collection: str | None = None
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=10_000, description="The label vocabulary (default: the shipped common vocabulary)."
    )
    labels_file: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Or a vocabulary file on the server."
    )
    threshold: float | None = Field(default=None, ge=0, le=1, description="Keep tags at or above this probability.")
    verify: bool = Field(default=False, description="Keep only the tags the generative model confirms.")


class CaptionJobCreate(Strict):
    kind: Literal["caption"]
    collection: str | None = None
    force: bool = Field(default=False, description="Caption every image, also those with a caption.")


JobCreate = Annotated[IndexJobCreate | TagJobCreate | CaptionJobCreate, Field(discriminator="kind")]


class FileErrorOut(BaseModel):
    source: str
    error: str
    reason: str


class JobOut(BaseModel):
    id: str
    kind: str
    collection: str
    source: str
    options: dict[str, Any]
    state: str
    total: int
    done: int
    failed: int
    chunks: int
    chunks_done: int
    errors: list[FileErrorOut]
    created: float
    started: float | None
    finished: float | None
    reason: str | None
    rate: float | None


class JobList(BaseModel):
    jobs: list[JobOut]


# --- ask, health -----------------------------------------------------------------------------------------------


class TurnIn(Strict):
    """One earlier turn of a conversation about the image: a question and the answer it got."""

    question: str = Field(min_length=1, max_length=MAX_TEXT)
    answer: str = Field(max_length=MAX_TEXT)


History = Annotated[
    list[TurnIn],
    Field(
        max_length=MAX_HISTORY,
        description="Earlier turns about the same image, oldest first; the oldest that do not fit the model's "
        "context are dropped (turns_dropped in the answer).",
    ),
]


class AskRequest(Strict):
    collection: str | None = None
    image_id: ImageId
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    history: History = Field(default_factory=list)


class AnswerOut(BaseModel):
    image: str = Field(description="The image id asked about, or '<upload>'.")
    question: str
    answer: str
    turns_used: int = Field(0, description="Earlier turns of the history the model read (the newest).")
    turns_dropped: int = Field(0, description="The oldest turns of the history left out to fit the context.")
    model: str = Field(description="Identity of the generative model that answered.")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checks: dict[str, str]
