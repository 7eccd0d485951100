"""The VectorStore contract shared by the FAISS and Qdrant stores, and the value types that cross it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from indexer.errors import ErrorCategory, VlsearchError
from indexer.payloads import (
    CAPTIONS_FIELD,
    LIST_FIELDS,
    TAKEN_FIELD,
    Payload,
    PayloadUpdate,
    merged_payload,
    parse_taken,
)
from retriever.errors import EncoderMismatch, InvalidQuery

# Payload, PayloadUpdate and its field names live beside the errors at the bottom (indexer/payloads.py): the
# pipeline writes them and the stores apply them. Re-exported here, the store contract's home.
__all__ = [
    "CAPTIONS_FIELD",
    "LIST_FIELDS",
    "CopyReport",
    "Filter",
    "Hit",
    "Manifest",
    "MigrationIncomplete",
    "Payload",
    "PayloadUpdate",
    "Record",
    "VectorStore",
    "check_page",
    "checked_query_vector",
    "copy_points",
    "merged_payload",
]


@dataclass(frozen=True)
class Manifest:
    """What built a collection. Queries with another encoder are refused (see `check_encoder`)."""

    encoder: str  # open_clip model name, e.g. "ViT-B-32", "hf-hub:org/repo" or a shipped name like "shapes-clip"
    weights: str  # pretrained tag, or "sha256:<hex>" of a checkpoint file, or "untrained"
    dim: int
    pretrained: str | None = (
        None  # how to load the weights again (tag, hf-hub id or file), for queries that name no model
    )
    preprocessing: dict[str, Any] = field(default_factory=dict)  # image_size, mean, std, interpolation, resize_mode
    store: str = "faiss"
    index_type: str = "flat"  # flat | hnsw | ivfpq

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(**json.loads(text))

    def check_encoder(self, encoder: str, weights: str, dim: int) -> None:
        """Raise EncoderMismatch unless (encoder, weights, dim) is what built this collection."""
        if (encoder, weights, dim) != (self.encoder, self.weights, self.dim):
            raise EncoderMismatch(
                f"collection was built with encoder {self.encoder!r} (weights {self.weights}, dim {self.dim}); "
                f"this query uses {encoder!r} (weights {weights}, dim {dim}). "
                "Use the same --model/--pretrained (VLSEARCH_CLIP_MODEL, VLSEARCH_CLIP_PRETRAINED) or re-index."
            )


@dataclass(frozen=True)
class Filter:
    """A payload filter; every field set must hold (AND). None/empty means 'no constraint'."""

    path_prefix: str | None = None  # some path of the image starts with this
    tags_any: tuple[str, ...] = ()  # the image has at least one of these tags
    tags_all: tuple[str, ...] = ()  # the image has all of these tags
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    min_bytes: int | None = None
    max_bytes: int | None = None
    # payload `taken` within these bounds, inclusive: ISO 8601 dates (midnight) or datetimes, kept in the payload's
    # naive form "YYYY-MM-DDTHH:MM:SS" (aware ones in UTC) and compared as such; images without `taken` never match
    taken_after: str | None = None
    taken_before: str | None = None

    def __post_init__(self) -> None:
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_taken(value))  # InvalidQuery for a value that is no date

    def is_empty(self) -> bool:
        return self == Filter()

    def matches(self, payload: Payload) -> bool:
        """Reference semantics of every filter field, evaluated in Python on one payload."""
        if self.path_prefix is not None and not any(
            str(p).startswith(self.path_prefix) for p in payload.get("paths", [])
        ):
            return False
        tags = set(payload.get("tags", []))
        if self.tags_any and not tags.intersection(self.tags_any):
            return False
        if self.tags_all and not tags.issuperset(self.tags_all):
            return False
        for key, low, high in (
            ("width", self.min_width, self.max_width),
            ("height", self.min_height, self.max_height),
            ("bytes", self.min_bytes, self.max_bytes),
        ):
            value = payload.get(key)
            if low is not None and (value is None or value < low):
                return False
            if high is not None and (value is None or value > high):
                return False
        if self.taken_after is not None or self.taken_before is not None:
            taken = payload.get(TAKEN_FIELD)
            if not isinstance(taken, str):
                return False
            if (self.taken_after is not None and taken < self.taken_after) or (
                self.taken_before is not None and taken > self.taken_before
            ):
                return False
        return True


@dataclass
class Record:
    """A stored point: id, payload and (when asked for) its vector."""

    id: str
    payload: Payload
    vector: np.ndarray | None = None


@dataclass
class Hit:
    """One search result. `score` ranks it in its mode: the inner product (cosine) with the query vector for
    vector search, BM25 for keyword search, the reciprocal-rank-fusion score for hybrid search."""

    id: str
    score: float
    payload: Payload
    rerank_score: float | None = None
    final_score: float | None = None
    relevance: float | None = None  # P("Yes") of the generative model, when the query asked for min_relevance

    @property
    def path(self) -> str | None:
        paths = self.payload.get("paths") or []
        return str(paths[0]) if paths else None


def checked_query_vector(vector: np.ndarray, manifest: Manifest, collection: str) -> np.ndarray:
    """The query as one finite float32 vector of the collection's dim (a (1, dim) array is accepted).

    Raises InvalidQuery for another shape or NaN/inf, EncoderMismatch for another dim (naming `collection`).
    """
    query = np.asarray(vector, dtype=np.float32)
    if query.ndim == 2 and query.shape[0] == 1:
        query = query[0]
    if query.ndim != 1:
        raise InvalidQuery(f"a query is one vector of dim {manifest.dim}, got an array of shape {query.shape}")
    if query.shape[0] != manifest.dim:
        raise EncoderMismatch(
            f"query vector has dim {query.shape[0]}; collection {collection} holds dim {manifest.dim} vectors "
            f"from {manifest.encoder!r} (weights {manifest.weights})"
        )
    if not np.isfinite(query).all():
        raise InvalidQuery("the query vector contains NaN or infinite values")
    return query


def check_page(k: int, offset: int) -> None:
    """Raise InvalidQuery unless k >= 1 and offset >= 0."""
    if k < 1:
        raise InvalidQuery(f"k must be at least 1, got {k}")
    if offset < 0:
        raise InvalidQuery(f"offset must be at least 0, got {offset}")


@runtime_checkable
class VectorStore(Protocol):
    """One collection of L2-normalised float32 vectors with payloads, addressed by string ids."""

    name: str
    manifest: Manifest

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload], merge_existing: bool = False
    ) -> None:
        """Insert or overwrite points; vectors has shape (len(ids), manifest.dim).

        merge_existing: an id stored already (the same image, written meanwhile by another process) keeps its
        vector and payload and gains what `merged_payload` adds (new paths and tags, missing fields), in the
        same write as the inserts.
        """
        ...

    def set_payload(self, id: str, payload: Payload) -> None:
        """Replace one point's payload, keeping its vector (PointNotFound when it does not exist).

        Only for a payload built whole by the caller: to change fields, use update_payloads.
        """
        ...

    def update_payloads(self, updates: Mapping[str, PayloadUpdate]) -> dict[str, Payload]:
        """Apply each id's PayloadUpdate to the payload as stored now (one transaction where the store has them):
        returns the new payloads of the ids that exist; ids that do not exist are left out."""
        ...

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> id of the stored image holding it, for the paths that some image holds (an index, no scan)."""
        ...

    def delete(self, ids: Sequence[str], only_if_empty: Sequence[str] = ()) -> int:
        """Delete points; returns how many were deleted. only_if_empty: only the points whose payload fields of
        these names are missing, null or empty, checked in the same write (a path another process added
        meanwhile keeps its image)."""
        ...

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Record]:
        """The points that exist among ids, in the order asked."""
        ...

    def count(self, filter: Filter | None = None) -> int: ...

    def scroll(
        self, filter: Filter | None = None, batch_size: int = 1000, with_vectors: bool = False
    ) -> Iterator[Record]:
        """Every matching point exactly once, ordered by id."""
        ...

    def search(
        self,
        vector: np.ndarray,
        k: int,
        filter: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[Hit]:
        """Hits offset..offset+k by descending score (ties by id), restricted by filter and min_score."""
        ...

    def keyword_search(self, text: str, k: int, filter: Filter | None = None, offset: int = 0) -> list[Hit]:
        """Hits offset..offset+k holding any word of text in their paths, tags or captions, by descending BM25
        (ties by id; see retriever/keywords.py), restricted by filter. Text without words finds nothing."""
        ...

    def save(self) -> bool:
        """Make every change so far durable (atomic: a crash leaves the previous state loadable); True when it
        completed, False when part of it had to wait for other processes (what committed is still safe)."""
        ...

    def close(self) -> None: ...


class MigrationIncomplete(VlsearchError):
    """After a copy between stores the target does not hold what the source holds."""

    category: ClassVar[ErrorCategory] = "conflict"


@dataclass(frozen=True)
class CopyReport:
    """What `copy_points` did: points copied, and the counts of both collections afterwards."""

    copied: int
    source_count: int
    target_count: int


def copy_points(source: VectorStore, target: VectorStore, batch_size: int = 1000) -> CopyReport:
    """Copy every point of source (vector and payload) into target, save it, and check that the counts agree.

    Upserts are idempotent, so an interrupted copy is finished by running it again.
    """
    asked, built = target.manifest, source.manifest
    if (asked.encoder, asked.weights, asked.dim) != (built.encoder, built.weights, built.dim):
        raise EncoderMismatch(
            f"collection {source.name!r} was built with {built.encoder!r} (weights {built.weights}, dim {built.dim}); "
            f"the target {target.name!r} holds {asked.encoder!r} (weights {asked.weights}, dim {asked.dim})"
        )
    copied = 0
    batch: list[Record] = []

    def flush() -> None:
        nonlocal copied
        vectors = np.stack([record.vector for record in batch if record.vector is not None])
        target.upsert([record.id for record in batch], vectors, [record.payload for record in batch])
        copied += len(batch)
        batch.clear()

    for record in source.scroll(batch_size=batch_size, with_vectors=True):
        batch.append(record)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    target.save()
    report = CopyReport(copied, source.count(), target.count())
    if report.target_count != report.source_count:
        raise MigrationIncomplete(
            f"copied {copied} points from {source.name!r}, which holds {report.source_count}, but the target "
            f"{target.name!r} holds {report.target_count}: it had other points already; drop it and copy again"
        )
    return report
