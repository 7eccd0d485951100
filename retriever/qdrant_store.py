"""The Qdrant store: one Qdrant collection per vlsearch collection, on a server or embedded (local mode).

Where a collection lives:
  server mode (`url`, `api_key`)  the Qdrant collection of the same name on that server (compose, cluster)
  local mode (`path`)             `path/<name>/`, an embedded Qdrant storage holding that one collection.
                                  Embedded Qdrant locks its directory: one open store per collection at a time,
                                  in one process; a second open is refused (a server allows any number).
The manifest is kept in the Qdrant collection's own metadata (key `vlsearch_manifest`) in both modes, so it
travels with the collection; a collection without it was not made by vlsearch and is refused.

Points: the point id is the UUID of the image id (a 32-hex content hash is one already; any other id maps
through uuid5), so re-indexing overwrites. The payload is the image's payload plus two reserved fields: the
image id and the words for keyword search (`retriever.keywords.payload_text`), the latter under a text index
with BM25 scoring. Distance is DOT: scores are inner products and vectors are stored as given. Writes wait for
the server (`wait=True`) and go in batches. Results are re-sorted by (score desc, id) so that ties go by id.

Scroll is by id: while every id is a content hash (a collection flag in the metadata), Qdrant's own point order
is id order and scroll streams; once another id was written, scroll sorts the ids of the matches first.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retriever.errors import (
    CollectionCorrupt,
    CollectionNotFound,
    EncoderMismatch,
    InvalidQuery,
    InvalidStoreSettings,
)
from retriever.keywords import payload_text, query_terms
from retriever.payload_db import encode_payload
from retriever.store import Filter, Hit, Manifest, Payload, Record, check_page, checked_query_vector

ID_FIELD = "vlsearch_id"  # the image id, as given (the point id is its UUID)
TEXT_FIELD = "vlsearch_text"  # the words keyword search matches
RESERVED_FIELDS = (ID_FIELD, TEXT_FIELD)
MANIFEST_KEY = "vlsearch_manifest"
ORDERED_KEY = "vlsearch_ids_are_hashes"  # True while every id is 32 hex digits: point order is then id order
INDEX_TYPES = ("flat", "hnsw")  # flat: exact search on the server; hnsw: Qdrant's graph. Local mode is exact.

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_ID_NAMESPACE = uuid.UUID("6f0b3c1e-4f5d-4a4e-9d87-2f1c5b7e9a30")  # fixed: the same id maps to the same point
_LOCAL_META = "meta.json"  # written by embedded Qdrant when it creates its storage
_PAYLOAD = models.PayloadSelectorExclude(exclude=[TEXT_FIELD])  # every field but the (long) words
_SCROLL_IDS_BATCH = 10_000

_TEXT_INDEX = models.TextIndexParams(
    type=models.TextIndexType.TEXT, tokenizer=models.TokenizerType.WORD, lowercase=True, scoring=True
)
# The fields filters use (server mode; local mode scans and keeps only the text index).
_PAYLOAD_INDEXES: dict[str, Any] = {
    TEXT_FIELD: _TEXT_INDEX,
    ID_FIELD: models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    "paths": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, prefix=True),
    "tags": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    **{
        key: models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER, lookup=False, range=True)
        for key in ("width", "height", "bytes")
    },
}


def point_uuid(point_id: str) -> str:
    """The Qdrant point id of an image id: the id itself when it is a 32-hex content hash, else its uuid5."""
    if _HEX_ID.fullmatch(point_id):
        return str(uuid.UUID(hex=point_id))
    return str(uuid.uuid5(_ID_NAMESPACE, point_id))


def qdrant_filter(filter: Filter | None) -> models.Filter | None:
    """The Qdrant filter that holds exactly when `Filter.matches(payload)` does."""
    if filter is None or filter.is_empty():
        return None
    must: list[Any] = []
    if filter.path_prefix is not None:
        # on an array, a condition holds when one element satisfies it: "some path starts with the prefix"
        must.append(models.FieldCondition(key="paths", match=models.MatchPrefix(prefix=filter.path_prefix)))
    if filter.tags_any:
        must.append(models.FieldCondition(key="tags", match=models.MatchAny(any=list(filter.tags_any))))
    for tag in sorted(set(filter.tags_all)):
        must.append(models.FieldCondition(key="tags", match=models.MatchValue(value=tag)))
    for key, low, high in (
        ("width", filter.min_width, filter.max_width),
        ("height", filter.min_height, filter.max_height),
        ("bytes", filter.min_bytes, filter.max_bytes),
    ):
        # a missing key or a null value fails a range, as in Filter.matches
        if low is not None or high is not None:
            must.append(models.FieldCondition(key=key, range=models.Range(gte=low, lte=high)))
    return models.Filter(must=must)


def check_manifest(manifest: Manifest) -> None:
    """Raise InvalidStoreSettings for a manifest the Qdrant store cannot serve."""
    if manifest.store != "qdrant":
        raise InvalidStoreSettings(f"manifest store is {manifest.store!r}; the Qdrant store needs 'qdrant'")
    if manifest.index_type not in INDEX_TYPES:
        raise InvalidStoreSettings(
            f"index type {manifest.index_type!r} is not available on Qdrant: use one of {', '.join(INDEX_TYPES)} "
            "(VLSEARCH_INDEX_TYPE)"
        )
    if manifest.dim < 1:
        raise InvalidStoreSettings(f"manifest dim must be positive, got {manifest.dim}")


def list_qdrant_collections(path: Path | None = None, url: str | None = None, api_key: str | None = None) -> list[str]:
    """Names of the collections on the server at url, or of the embedded ones under path (without opening them)."""
    if url is None:
        if path is None:
            raise InvalidStoreSettings("listing Qdrant collections needs a server url or a local path")
        root = Path(path)
        return sorted(p.name for p in root.iterdir() if (p / _LOCAL_META).exists()) if root.is_dir() else []
    client = QdrantClient(url=url, api_key=api_key, check_compatibility=False)
    try:
        return sorted(collection.name for collection in client.get_collections().collections)
    except (ResponseHandlingException, UnexpectedResponse) as error:
        raise InvalidStoreSettings(
            f"cannot list the collections of Qdrant at {url} (VLSEARCH_QDRANT_URL): {error}"
        ) from None
    finally:
        client.close()


def _connect_local(directory: Path, name: str) -> QdrantClient:
    try:
        return QdrantClient(path=str(directory))
    except RuntimeError as error:
        if "already accessed" not in str(error):
            raise
        raise InvalidStoreSettings(
            f"collection {name!r} at {directory} is open elsewhere: embedded Qdrant (VLSEARCH_QDRANT_PATH) allows "
            "one open store per collection at a time; close the other, or use a Qdrant server (VLSEARCH_QDRANT_URL)"
        ) from None


def _speed_up_local_writes(client: QdrantClient, name: str) -> sqlite3.Connection | None:
    """Put embedded Qdrant's SQLite file in WAL mode with synchronous=NORMAL, and return its connection.

    Embedded Qdrant commits every point on its own, and each commit fsyncs: 5 ms a point on our CI disks, 18 min
    for 200k images. With WAL and synchronous=NORMAL (as in our FAISS store) a point takes 0.3 ms; commits stay
    atomic and survive a process crash, and `save()` checkpoints for power loss. Reached through private
    attributes: when a qdrant-client release moves them, writes are only slower.
    """
    collections = getattr(getattr(client, "_client", None), "collections", None)
    storage = getattr(getattr(collections, "get", lambda _: None)(name), "storage", None)
    connection = getattr(storage, "storage", None)
    if not isinstance(connection, sqlite3.Connection):
        return None
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


class QdrantStore:
    """A vlsearch collection in Qdrant. Thread-safe: local-mode calls are serialised (embedded Qdrant is not)."""

    def __init__(
        self,
        client: QdrantClient,
        name: str,
        manifest: Manifest,
        *,
        where: str,
        local_directory: Path | None,
        ids_are_hashes: bool,
        hnsw_ef: int,
        batch_size: int,
    ) -> None:
        """Use `QdrantStore.open`; this assumes the collection exists and its manifest is checked."""
        self.name = name
        self.manifest = manifest
        self.where = where  # for messages: the directory, or the collection on its server
        self.hnsw_ef = hnsw_ef
        self.batch_size = batch_size
        self._client = client
        self._local_directory = local_directory
        self._ids_are_hashes = ids_are_hashes
        self._lock: AbstractContextManager[Any] = threading.RLock() if local_directory else nullcontext()
        self._closed = False
        self._local_db = _speed_up_local_writes(client, name) if local_directory else None
        self._ensure_payload_indexes()

    @classmethod
    def open(
        cls,
        name: str,
        manifest: Manifest | None = None,
        *,
        path: Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        hnsw_ef: int = 128,
        batch_size: int = 256,
        timeout: int = 60,
    ) -> QdrantStore:
        """Open collection `name` on the server at url, or under the local directory path; create it with manifest
        when it does not exist. Another encoder raises EncoderMismatch; missing without a manifest, CollectionNotFound.
        """
        if (path is None) == (url is None):
            raise InvalidStoreSettings(
                "the Qdrant store needs a server url (VLSEARCH_QDRANT_URL) or a local path (VLSEARCH_QDRANT_PATH)"
            )
        if hnsw_ef < 1 or batch_size < 1:
            raise InvalidStoreSettings(f"hnsw_ef and batch_size must be at least 1, got {hnsw_ef} and {batch_size}")
        if manifest is not None:
            check_manifest(manifest)
        local_directory = Path(path) / name if path is not None else None
        if local_directory is not None:
            where = str(local_directory)
            if manifest is None and not (local_directory / _LOCAL_META).exists():
                raise CollectionNotFound(f"no collection {name!r} at {where}; index images into it first")
            client = _connect_local(local_directory, name)
        else:
            where = f"{name!r} on {url}"
            # no version probe on connect: against an unreachable server it only adds a warning to our error
            client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        try:
            stored, ids_are_hashes = cls._open_collection(client, name, manifest, where, url)
            return cls(
                client,
                name,
                stored,
                where=where,
                local_directory=local_directory,
                ids_are_hashes=ids_are_hashes,
                hnsw_ef=hnsw_ef,
                batch_size=batch_size,
            )
        except BaseException:
            client.close()
            raise

    @staticmethod
    def _open_collection(
        client: QdrantClient, name: str, manifest: Manifest | None, where: str, url: str | None
    ) -> tuple[Manifest, bool]:
        """The collection's manifest and id-order flag, creating the collection when it is missing."""
        try:
            exists = client.collection_exists(name)
        except UnexpectedResponse as error:
            if error.status_code in (401, 403):
                raise InvalidStoreSettings(
                    f"Qdrant at {url} refused the API key (VLSEARCH_QDRANT_API_KEY): {error.reason_phrase}"
                ) from None
            raise InvalidStoreSettings(f"Qdrant at {url} (VLSEARCH_QDRANT_URL) answered: {error}") from None
        except ResponseHandlingException as error:
            raise InvalidStoreSettings(f"cannot reach Qdrant at {url} (VLSEARCH_QDRANT_URL): {error.source}") from None
        if not exists:
            if manifest is None:
                raise CollectionNotFound(f"no collection {where}; index images into it first")
            client.create_collection(
                name,
                vectors_config=models.VectorParams(size=manifest.dim, distance=models.Distance.DOT),
                metadata={MANIFEST_KEY: asdict(manifest), ORDERED_KEY: True},
            )
            return manifest, True
        metadata = client.get_collection(name).config.metadata or {}
        try:
            stored = Manifest(**metadata[MANIFEST_KEY])
        except (KeyError, TypeError) as error:
            raise CollectionCorrupt(
                f"Qdrant collection {where} has no readable vlsearch manifest (metadata key {MANIFEST_KEY!r}: "
                f"{error}); it was not made by vlsearch"
            ) from None
        if manifest is not None:
            if (manifest.encoder, manifest.weights, manifest.dim) != (stored.encoder, stored.weights, stored.dim):
                raise EncoderMismatch(
                    f"collection {where} was built with encoder {stored.encoder!r} (weights {stored.weights}, "
                    f"dim {stored.dim}); it was opened for {manifest.encoder!r} (weights {manifest.weights}, "
                    f"dim {manifest.dim}). Use the model that built it, or index into a new collection."
                )
            if manifest.index_type != stored.index_type:
                stored = replace(stored, index_type=manifest.index_type)
                client.update_collection(name, metadata={MANIFEST_KEY: asdict(stored)})
        check_manifest(stored)
        return stored, bool(metadata.get(ORDERED_KEY))

    def _ensure_payload_indexes(self) -> None:
        """Index the fields filters and keyword search use; a collection made by an interrupted create gets them."""
        with self._lock:
            if self._local_directory is not None:
                # local mode scans payloads; only the text index (it enables BM25 queries) has an effect there
                self._client.create_payload_index(self.name, TEXT_FIELD, field_schema=_TEXT_INDEX, wait=True)
                return
            existing = self._client.get_collection(self.name).payload_schema or {}
            for field, schema in _PAYLOAD_INDEXES.items():
                if field not in existing:
                    self._client.create_payload_index(self.name, field, field_schema=schema, wait=True)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> QdrantStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"collection {self.name!r} ({self.where}) is closed")

    def save(self) -> None:
        """Make every change durable. Writes waited for the server already; local mode checkpoints its SQLite WAL."""
        with self._lock:
            self._check_open()
            if self._local_db is not None:
                self._local_db.execute("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        """Save and release the collection (and, in local mode, its directory lock); closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._local_db is not None:
                    self._local_db.execute("PRAGMA wal_checkpoint(FULL)")
            finally:
                self._client.close()
                self._closed = True

    def drop(self) -> None:
        """Delete the collection (in local mode, its directory too)."""
        with self._lock:
            if not self._closed:
                self._client.delete_collection(self.name)
                self._client.close()
                self._closed = True
            if self._local_directory is not None:
                shutil.rmtree(self._local_directory, ignore_errors=True)

    # --- writes --------------------------------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.manifest.dim:
            raise EncoderMismatch(
                f"vectors of shape {array.shape} cannot go into collection {self.where}, which holds dim "
                f"{self.manifest.dim} vectors from {self.manifest.encoder!r} (weights {self.manifest.weights})"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"vectors for collection {self.where} contain NaN or infinite values")
        return array

    def _stored_payload(self, point_id: str, payload: Payload) -> Payload:
        """The payload as Qdrant keeps it: plain JSON values, plus the id and the words for keyword search."""
        reserved = [key for key in RESERVED_FIELDS if key in payload]
        if reserved:
            raise ValueError(f"payload keys {reserved} are reserved by the Qdrant store (collection {self.where})")
        stored: Payload = json.loads(encode_payload(payload))
        return {**stored, ID_FIELD: point_id, TEXT_FIELD: payload_text(payload)}

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload]) -> None:
        """Insert or overwrite points in batches of batch_size; a repeated id keeps its last vector and payload."""
        array = self._check_vectors(vectors)
        if not len(ids) == len(array) == len(payloads):
            raise ValueError(f"upsert got {len(ids)} ids, {len(array)} vectors and {len(payloads)} payloads")
        rows = sorted({point_id: i for i, point_id in enumerate(ids)}.values())
        stored = {i: self._stored_payload(ids[i], payloads[i]) for i in rows}
        with self._lock:
            self._check_open()
            if self._ids_are_hashes and not all(_HEX_ID.fullmatch(ids[i]) for i in rows):
                # flagged before the write: a crash in between leaves scroll slower, never out of order
                self._client.update_collection(self.name, metadata={ORDERED_KEY: False})
                self._ids_are_hashes = False
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                self._client.upsert(
                    self.name,
                    points=models.Batch(
                        ids=[point_uuid(ids[i]) for i in batch],
                        vectors=array[batch].tolist(),
                        payloads=[stored[i] for i in batch],
                    ),
                    wait=True,
                )

    def set_payload(self, id: str, payload: Payload) -> None:
        """Replace one point's payload, keeping its vector; KeyError when the id does not exist."""
        stored = self._stored_payload(id, payload)
        with self._lock:
            self._check_open()
            if not self._client.retrieve(self.name, ids=[point_uuid(id)], with_payload=False):
                raise KeyError(f"no point {id!r} in collection {self.where}")
            self._client.overwrite_payload(self.name, payload=stored, points=[point_uuid(id)], wait=True)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points; returns how many existed."""
        uuids = list(dict.fromkeys(point_uuid(point_id) for point_id in ids))
        with self._lock:
            self._check_open()
            existing = [record.id for record in self._client.retrieve(self.name, ids=uuids, with_payload=False)]
            if existing:
                self._client.delete(self.name, points_selector=models.PointIdsList(points=existing), wait=True)
        return len(existing)

    # --- reads ---------------------------------------------------------------------------------------------

    @staticmethod
    def _record(point: models.Record | models.ScoredPoint) -> Record:
        payload = dict(point.payload or {})
        point_id = str(payload.pop(ID_FIELD))
        payload.pop(TEXT_FIELD, None)
        vector = None if point.vector is None else np.asarray(point.vector, dtype=np.float32)
        return Record(point_id, payload, vector)

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> list[Record]:
        """The points that exist among ids, in the order asked."""
        uuids = [point_uuid(point_id) for point_id in ids]
        with self._lock:
            self._check_open()
            found = self._client.retrieve(
                self.name, ids=list(dict.fromkeys(uuids)), with_payload=_PAYLOAD, with_vectors=with_vectors
            )
        by_uuid = {str(point.id): self._record(point) for point in found}
        return [by_uuid[key] for key in uuids if key in by_uuid]

    def count(self, filter: Filter | None = None) -> int:
        """How many points match filter (all points for None)."""
        with self._lock:
            self._check_open()
            return self._client.count(self.name, count_filter=qdrant_filter(filter), exact=True).count

    def scroll(
        self, filter: Filter | None = None, batch_size: int = 1000, with_vectors: bool = False
    ) -> Iterator[Record]:
        """Every matching point exactly once, ordered by id, read in batches of batch_size."""
        if batch_size < 1:
            raise InvalidQuery(f"scroll batch_size must be at least 1, got {batch_size}")
        if self._ids_are_hashes:
            return self._scroll_in_point_order(qdrant_filter(filter), batch_size, with_vectors)
        return self._scroll_sorted(qdrant_filter(filter), batch_size, with_vectors)

    def _scroll_in_point_order(
        self, condition: models.Filter | None, batch_size: int, with_vectors: bool
    ) -> Iterator[Record]:
        offset: Any = None
        while True:
            with self._lock:  # per batch, so a long scroll does not hold writers back
                self._check_open()
                points, offset = self._client.scroll(
                    self.name,
                    scroll_filter=condition,
                    limit=batch_size,
                    offset=offset,
                    with_payload=_PAYLOAD,
                    with_vectors=with_vectors,
                )
            yield from (self._record(point) for point in points)
            if offset is None:
                return

    def _scroll_sorted(self, condition: models.Filter | None, batch_size: int, with_vectors: bool) -> Iterator[Record]:
        # The ids of all matches fit in memory (about 100 bytes each); the points are then read batch by batch.
        keys: list[tuple[str, str]] = []
        offset: Any = None
        while True:
            with self._lock:
                self._check_open()
                points, offset = self._client.scroll(
                    self.name,
                    scroll_filter=condition,
                    limit=_SCROLL_IDS_BATCH,
                    offset=offset,
                    with_payload=[ID_FIELD],
                )
            keys += [(str((point.payload or {})[ID_FIELD]), str(point.id)) for point in points]
            if offset is None:
                break
        keys.sort()
        for start in range(0, len(keys), batch_size):
            uuids = [key for _, key in keys[start : start + batch_size]]
            with self._lock:
                self._check_open()
                found = self._client.retrieve(self.name, ids=uuids, with_payload=_PAYLOAD, with_vectors=with_vectors)
            by_uuid = {str(point.id): point for point in found}
            yield from (self._record(by_uuid[key]) for key in uuids if key in by_uuid)  # deleted meanwhile: gone

    def _check_query(self, vector: np.ndarray) -> list[float]:
        return [float(value) for value in checked_query_vector(vector, self.manifest, self.where)]

    def search(
        self,
        vector: np.ndarray,
        k: int,
        filter: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
    ) -> list[Hit]:
        """Hits offset..offset+k by descending inner product (ties by id), within filter and min_score."""
        query = self._check_query(vector)
        check_page(k, offset)
        need = offset + k
        condition = qdrant_filter(filter)
        # On a server the HNSW traversal depends on ef, not on the limit: asking for max(need + 1, ef) candidates
        # with that ef makes every page with offset + k <= ef come from one candidate list (stable pagination).
        # min_score is applied here, after ranking, not passed as Qdrant's score_threshold (which is exclusive).
        server = self._local_directory is None

        def fetch(limit: int) -> list[models.ScoredPoint]:
            params = (
                models.SearchParams(hnsw_ef=max(self.hnsw_ef, limit), exact=self.manifest.index_type == "flat")
                if server
                else None
            )
            return self._client.query_points(
                self.name,
                query=query,
                query_filter=condition,
                limit=limit,
                with_payload=_PAYLOAD,
                search_params=params,
            ).points

        ranked = self._ranked(fetch, need, max(need + 1, self.hnsw_ef) if server else need + 1)
        return [hit for hit in ranked[offset:need] if min_score is None or hit.score >= min_score]

    def keyword_search(self, text: str, k: int, filter: Filter | None = None, offset: int = 0) -> list[Hit]:
        """Hits offset..offset+k holding any word of text (paths, tags, captions) by descending BM25, ties by id."""
        check_page(k, offset)
        terms = query_terms(text)
        if not terms:
            return []
        need = offset + k
        condition = qdrant_filter(filter)

        def fetch(limit: int) -> list[models.ScoredPoint]:
            return self._client.query_points(
                self.name,
                query=models.TextQuery(text=" ".join(terms)),
                using=TEXT_FIELD,
                query_filter=condition,
                limit=limit,
                with_payload=_PAYLOAD,
            ).points

        return self._ranked(fetch, need, need + 1)[offset:need]

    def _ranked(self, fetch: Callable[[int], list[models.ScoredPoint]], need: int, pool: int) -> list[Hit]:
        """The best `need` hits by (score desc, id): fetches more while the candidates end inside a run of ties."""
        with self._lock:
            self._check_open()
            while True:
                points = fetch(pool)
                if len(points) < pool or points[need - 1].score != points[-1].score:
                    break
                pool *= 2
        records = [(point.score, self._record(point)) for point in points]
        hits = [Hit(id=record.id, score=score, payload=record.payload) for score, record in records]
        hits.sort(key=lambda hit: (-hit.score, hit.id))
        return hits[:need]
