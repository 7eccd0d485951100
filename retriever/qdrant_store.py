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

Errors: a server out of reach, timing out or answering 5xx raises StoreUnavailable naming VLSEARCH_QDRANT_URL; a
closed store CollectionClosed; an embedded collection another store holds, StoreBusy. A store opened before a
fork is never used through the parent's connection in the child: server mode reconnects there, embedded mode
(whose directory the parent holds) refuses with StoreBusy.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from indexer.errors import StoreUnavailable, VlsearchError
from retriever.errors import (
    CollectionClosed,
    CollectionCorrupt,
    CollectionNotFound,
    EncoderMismatch,
    InvalidQuery,
    InvalidStoreSettings,
    PointNotFound,
    StoreBusy,
)
from retriever.keywords import payload_text, query_terms
from retriever.payload_db import encode_payload
from retriever.store import (
    CAPTIONS_FIELD,
    LIST_FIELDS,
    Filter,
    Hit,
    Manifest,
    Payload,
    PayloadUpdate,
    Record,
    check_page,
    checked_query_vector,
    merged_payload,
)

try:  # grpcio comes with qdrant-client; its errors are transport errors too when a client prefers gRPC
    from grpc import RpcError as _RpcError
except ImportError:  # pragma: no cover
    _RpcError = OSError

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
_PATHS_BATCH = 1000  # paths per MatchAny filter in ids_by_path
_UPDATE_ATTEMPTS = 8  # rounds of read, write and check in update_payloads before StoreBusy
_TRANSPORT_ERRORS = (ResponseHandlingException, httpx.TransportError, _RpcError)

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
    "taken": models.DatetimeIndexParams(type=models.DatetimeIndexType.DATETIME),
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
    if filter.taken_after is not None or filter.taken_before is not None:
        # naive bounds and payload values are both read as UTC; a missing or non-date `taken` fails the range
        must.append(
            models.FieldCondition(
                key="taken",
                range=models.DatetimeRange(gte=_as_utc(filter.taken_after), lte=_as_utc(filter.taken_before)),
            )
        )
    return models.Filter(must=must)


def _as_utc(bound: str | None) -> datetime | None:
    return None if bound is None else datetime.fromisoformat(bound).replace(tzinfo=UTC)


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
    except (*_TRANSPORT_ERRORS, UnexpectedResponse) as error:
        raise _server_error(error, url) or error from None
    finally:
        client.close()


def _server_error(error: BaseException, url: str | None, where: str | None = None) -> VlsearchError | None:
    """The typed error for an exception of the client talking to the server at url; None when it is not one."""
    if isinstance(error, _TRANSPORT_ERRORS):
        reason = error.source if isinstance(error, ResponseHandlingException) else error
        return StoreUnavailable(f"cannot reach Qdrant at {url} (VLSEARCH_QDRANT_URL): {reason}")
    if isinstance(error, UnexpectedResponse) and error.status_code is not None:
        if error.status_code in (401, 403):
            return InvalidStoreSettings(
                f"Qdrant at {url} refused the API key (VLSEARCH_QDRANT_API_KEY): {error.reason_phrase}"
            )
        if error.status_code == 404 and where is not None and "collection" in str(error).lower():
            return CollectionNotFound(f"collection {where} no longer exists (dropped by another process?)")
        if error.status_code >= 500 or error.status_code in (408, 429):
            return StoreUnavailable(
                f"Qdrant at {url} (VLSEARCH_QDRANT_URL) cannot answer now: {error.status_code} {error.reason_phrase}"
            )
    return None


def _never_close(*args: Any, **kwargs: Any) -> None:
    """Replaces `close` of a client inherited through a fork: closing it in the child would unlock the parent's
    embedded directory (a flock shared across the fork) or end the parent's connections."""


_INHERITED_CLIENTS: list[QdrantClient] = []  # kept referenced in a forked child, so that nothing finalises them
_OPEN_STORES: weakref.WeakSet[QdrantStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_OPEN_STORES):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect_local(directory: Path, name: str) -> QdrantClient:
    try:
        return QdrantClient(path=str(directory))
    except RuntimeError as error:
        if "already accessed" not in str(error):
            raise
        raise StoreBusy(
            f"collection {name!r} at {directory} is open elsewhere: embedded Qdrant (VLSEARCH_QDRANT_PATH) allows "
            "one open store per collection, in one process, at a time; close the other, or use a Qdrant server "
            "(VLSEARCH_QDRANT_URL) for several processes"
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
        url: str | None = None,
        api_key: str | None = None,
        timeout: int = 60,
    ) -> None:
        """Use `QdrantStore.open`; this assumes the collection exists and its manifest is checked."""
        self.name = name
        self.manifest = manifest
        self.where = where  # for messages: the directory, or the collection on its server
        self.hnsw_ef = hnsw_ef
        self.batch_size = batch_size
        self._client = client
        self._url, self._api_key, self._timeout = url, api_key, timeout  # to reconnect in a forked child
        self._local_directory = local_directory
        self._ids_are_hashes = ids_are_hashes
        self._lock: AbstractContextManager[Any] = threading.RLock() if local_directory else nullcontext()
        self._closed = False
        self._pid = os.getpid()
        self._fork_error: str | None = None  # set in a forked child of the process that holds the embedded storage
        self._local_db = _speed_up_local_writes(client, name) if local_directory else None
        self._ensure_payload_indexes()
        _OPEN_STORES.add(self)

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
        when it does not exist. Another encoder raises EncoderMismatch; missing without a manifest, CollectionNotFound;
        a server out of reach StoreUnavailable; an embedded collection open elsewhere StoreBusy.
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
            client = _connect_server(url, api_key, timeout)
        try:
            try:
                stored, ids_are_hashes = cls._open_collection(client, name, manifest, where)
                return cls(
                    client,
                    name,
                    stored,
                    where=where,
                    local_directory=local_directory,
                    ids_are_hashes=ids_are_hashes,
                    hnsw_ef=hnsw_ef,
                    batch_size=batch_size,
                    url=url,
                    api_key=api_key,
                    timeout=timeout,
                )
            except (*_TRANSPORT_ERRORS, UnexpectedResponse) as error:
                typed = _server_error(error, url)
                if typed is None and isinstance(error, UnexpectedResponse):
                    typed = InvalidStoreSettings(f"Qdrant at {url} (VLSEARCH_QDRANT_URL) answered: {error}")
                if typed is None:
                    raise
                raise typed from None
        except BaseException:
            client.close()
            raise

    @staticmethod
    def _open_collection(
        client: QdrantClient, name: str, manifest: Manifest | None, where: str
    ) -> tuple[Manifest, bool]:
        """The collection's manifest and id-order flag, creating the collection when it is missing."""
        if not client.collection_exists(name):
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
        with self._using() as client:
            if self._local_directory is not None:
                # local mode scans payloads; only the text index (it enables BM25 queries) has an effect there
                client.create_payload_index(self.name, TEXT_FIELD, field_schema=_TEXT_INDEX, wait=True)
                return
            existing = client.get_collection(self.name).payload_schema or {}
            for field, schema in _PAYLOAD_INDEXES.items():
                if field not in existing:
                    client.create_payload_index(self.name, field, field_schema=schema, wait=True)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> QdrantStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _using(self) -> Iterator[QdrantClient]:
        """The client, under the local-mode lock, for a store that is open in this process; server errors typed."""
        if self._pid != os.getpid():  # forked without the at-fork hook having run
            self._forked()
        with self._lock:
            if self._fork_error is not None:
                raise StoreBusy(self._fork_error)
            if self._closed:
                raise CollectionClosed(f"collection {self.name!r} ({self.where}) is closed; open it again")
            try:
                yield self._client
            except (*_TRANSPORT_ERRORS, UnexpectedResponse) as error:
                typed = _server_error(error, self._url, self.where)
                if typed is None:
                    raise
                raise typed from None

    def _forked(self) -> None:
        """In a forked child: the parent's client is neither used nor closed here (its connections and the embedded
        directory's lock belong to the parent); server mode connects again, embedded mode refuses every call."""
        parent, self._pid = self._pid, os.getpid()
        self._lock = threading.RLock() if self._local_directory else nullcontext()  # may be held by a parent thread
        if self._closed:
            return
        inherited = self._client
        inherited.close = _never_close  # type: ignore[method-assign]
        _INHERITED_CLIENTS.append(inherited)
        self._local_db = None
        if self._local_directory is None:
            self._client = _connect_server(self._url, self._api_key, self._timeout)
            return
        self._fork_error = (
            f"collection {self.name!r} at {self.where} was opened by process {parent} before this process forked, "
            "and that process holds it: embedded Qdrant (VLSEARCH_QDRANT_PATH) serves one process at a time. Open "
            "it in one process only, or use a Qdrant server (VLSEARCH_QDRANT_URL) for several processes"
        )

    def save(self) -> bool:
        """Make every change durable; True (writes waited for the server already; local mode checkpoints its WAL)."""
        with self._using():
            if self._local_db is not None:
                self._local_db.execute("PRAGMA wal_checkpoint(FULL)")
        return True

    def close(self) -> None:
        """Save and release the collection (and, in local mode, its directory lock); closing twice is harmless.

        In a forked child this releases nothing of the parent's."""
        if self._pid != os.getpid():
            self._forked()
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
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            if self._fork_error is not None:
                raise StoreBusy(self._fork_error)
            if not self._closed:
                with self._using() as client:
                    client.delete_collection(self.name)
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

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Payload], merge_existing: bool = False
    ) -> None:
        """Insert or overwrite points in batches of batch_size; a repeated id keeps its last vector and payload.

        merge_existing: ids stored already keep their vector and payload and gain what `merged_payload` adds,
        through update_payloads. Qdrant has no insert-if-absent: a point another process inserts between this
        call's look-up and its write is overwritten, with the look-up moments before the write.
        """
        array = self._check_vectors(vectors)
        if not len(ids) == len(array) == len(payloads):
            raise ValueError(f"upsert got {len(ids)} ids, {len(array)} vectors and {len(payloads)} payloads")
        rows = sorted({point_id: i for i, point_id in enumerate(ids)}.values())
        if merge_existing:
            stored_now = {record.id: record.payload for record in self.get([ids[i] for i in rows])}
            if stored_now:
                merges = {}
                for i in rows:
                    if ids[i] in stored_now:
                        before = stored_now[ids[i]]
                        merged = merged_payload(before, payloads[i])
                        captions_before = before.get(CAPTIONS_FIELD) or {}
                        merges[ids[i]] = PayloadUpdate(  # only what the merge adds: nothing read is written back
                            add={name: tuple(merged[name]) for name in LIST_FIELDS if merged.get(name)},
                            captions={
                                key: text
                                for key, text in (merged.get(CAPTIONS_FIELD) or {}).items()
                                if key not in captions_before
                            },
                            set={
                                key: value
                                for key, value in merged.items()
                                if key not in before and key not in LIST_FIELDS and key != CAPTIONS_FIELD
                            },
                        )
                self.update_payloads(merges)
                rows = [i for i in rows if ids[i] not in stored_now]
                if not rows:
                    return
        stored = {i: self._stored_payload(ids[i], payloads[i]) for i in rows}
        with self._using() as client:
            if self._ids_are_hashes and not all(_HEX_ID.fullmatch(ids[i]) for i in rows):
                # flagged before the write: a crash in between leaves scroll slower, never out of order
                client.update_collection(self.name, metadata={ORDERED_KEY: False})
                self._ids_are_hashes = False
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                client.upsert(
                    self.name,
                    points=models.Batch(
                        ids=[point_uuid(ids[i]) for i in batch],
                        vectors=array[batch].tolist(),
                        payloads=[stored[i] for i in batch],
                    ),
                    wait=True,
                )

    def set_payload(self, id: str, payload: Payload) -> None:
        """Replace one point's payload, keeping its vector; PointNotFound when the id does not exist."""
        stored = self._stored_payload(id, payload)
        missing = PointNotFound(f"no point {id!r} in collection {self.where}")
        with self._using() as client:
            if not client.retrieve(self.name, ids=[point_uuid(id)], with_payload=False):
                raise missing
            try:
                client.overwrite_payload(self.name, payload=stored, points=[point_uuid(id)], wait=True)
            except KeyError:  # local mode: deleted since the check
                raise missing from None
            except UnexpectedResponse as error:
                if error.status_code == 404 and "point" in str(error).lower():
                    raise missing from None
                raise

    def update_payloads(self, updates: Mapping[str, PayloadUpdate]) -> dict[str, Payload]:
        """Apply each id's PayloadUpdate to the payload as stored now; the new payloads of the ids that exist.

        Nothing writes back a whole payload read earlier. Per point, in one request (applied in order; Qdrant has
        no multi-operation transaction): the fields of `set` by a top-level set_payload (merged by Qdrant itself),
        fields set to None by delete_payload, new caption entries by set_payload under the key `captions` (merged
        into that object by Qdrant), and the keyword text, which is derived from paths, tags and captions.
        A list field (`paths`, `tags`) has no atomic append in Qdrant: its new value is computed from the value
        read just before and written under a filter that holds only while the field still has that value (a
        compare-and-set, applied by Qdrant in one operation); then the point is read back. While another writer's
        change makes a list field differ from what this update should give (our values missing or removed ones
        back), or the keyword text from its sources, the point is read, written and checked again, at most
        _UPDATE_ATTEMPTS times before StoreBusy. The compare-and-set tests the list's values and their count, not
        their order: a concurrent change of the order alone is not seen.
        """
        plain = {image_id: self._plain_update(update) for image_id, update in updates.items()}
        items = list(plain.items())
        results: dict[str, Payload] = {}
        for start in range(0, len(items), self.batch_size):
            results.update(self._update_batch(dict(items[start : start + self.batch_size])))
        return {image_id: results[image_id] for image_id in updates if image_id in results}

    def _plain_update(self, update: PayloadUpdate) -> PayloadUpdate:
        """The update with plain JSON values (as stored), so that what it gives compares equal to what is read."""
        reserved = [key for key in update.set if key in RESERVED_FIELDS]
        if reserved:
            raise ValueError(f"payload keys {reserved} are reserved by the Qdrant store (collection {self.where})")

        def plain(value: Any) -> Any:
            return json.loads(encode_payload(value))

        return PayloadUpdate(
            set={name: plain(value) for name, value in update.set.items()},
            add={name: tuple(plain(list(values))) for name, values in update.add.items()},
            remove={name: tuple(plain(list(values))) for name, values in update.remove.items()},
            captions=plain(dict(update.captions)),
        )

    def _update_batch(self, updates: dict[str, PayloadUpdate]) -> dict[str, Payload]:
        keys = {image_id: point_uuid(image_id) for image_id in updates}
        results: dict[str, Payload] = {}
        with self._using() as client:
            stored = self._read_stored(client, list(keys.values()))
            pending = updates
            for attempt in range(_UPDATE_ATTEMPTS):
                operations: list[models.UpdateOperation] = []
                written: dict[str, PayloadUpdate] = {}
                for image_id, update in pending.items():
                    found = stored.get(keys[image_id])
                    if found is None:
                        continue  # no such point (or deleted meanwhile): left out
                    planned = self._planned(keys[image_id], update, found)
                    if planned:
                        operations += planned
                        written[image_id] = update
                    else:
                        results[image_id] = _user_payload(found)
                if not operations:
                    return results
                client.batch_update_points(self.name, update_operations=operations, wait=True)
                stored = self._read_stored(client, [keys[image_id] for image_id in written])
                pending = {}
                for image_id, update in written.items():
                    found = stored.get(keys[image_id])
                    if found is None:
                        continue
                    if _settled(update, found):
                        results[image_id] = _user_payload(found)
                    else:
                        # set fields and captions were merged by Qdrant: only the list fields and text are redone
                        pending[image_id] = replace(update, set={}, captions={})
                if not pending:
                    return results
                time.sleep(random.uniform(0, 0.002 * 2**attempt))  # out of step with the other writer
        raise StoreBusy(
            f"the payloads of {', '.join(sorted(pending))} in collection {self.where} kept changing under other "
            f"writers through {_UPDATE_ATTEMPTS} attempts; try again"
        )

    def _read_stored(self, client: QdrantClient, keys: list[str]) -> dict[str, Payload]:
        """Point uuid -> payload as stored (with the reserved fields), for the points that exist."""
        if not keys:
            return {}
        points = client.retrieve(self.name, ids=keys, with_payload=True)
        return {str(point.id): dict(point.payload or {}) for point in points}

    @staticmethod
    def _planned(key: str, update: PayloadUpdate, stored: Payload) -> list[models.UpdateOperation]:
        """The operations that take the stored payload to what update gives; none for what is already so."""
        if update.is_empty():
            return []
        current = _user_payload(stored)
        expected = update.apply(current)
        point = models.Filter(must=[models.HasIdCondition(has_id=[key])])  # a deleted point matches nothing
        operations: list[models.UpdateOperation] = []
        fields = {name: value for name, value in update.set.items() if value is not None and current.get(name) != value}
        if fields:
            operations.append(models.SetPayloadOperation(set_payload=models.SetPayload(payload=fields, filter=point)))
        gone = [name for name, value in update.set.items() if value is None and name in current]
        if gone:
            operations.append(
                models.DeletePayloadOperation(delete_payload=models.DeletePayload(keys=gone, filter=point))
            )
        lists = {
            name: expected[name]
            for name in dict.fromkeys([*update.remove, *update.add])
            if name in expected and expected[name] != current.get(name)
        }
        if lists:
            unchanged = _still_holding(key, {name: current.get(name) for name in lists})
            operations.append(
                models.SetPayloadOperation(set_payload=models.SetPayload(payload=lists, filter=unchanged))
            )
        captions = current.get(CAPTIONS_FIELD)
        known = captions if isinstance(captions, dict) else {}
        new_captions = {model: text for model, text in update.captions.items() if known.get(model) != text}
        if new_captions:
            operations.append(
                models.SetPayloadOperation(
                    set_payload=models.SetPayload(payload=new_captions, key=CAPTIONS_FIELD, filter=point)
                )
            )
        text = payload_text(expected)
        if stored.get(TEXT_FIELD) != text:
            operations.append(
                models.SetPayloadOperation(set_payload=models.SetPayload(payload={TEXT_FIELD: text}, filter=point))
            )
        return operations

    def delete(self, ids: Sequence[str], only_if_empty: Sequence[str] = ()) -> int:
        """Delete points; returns how many were deleted. only_if_empty: only the points whose fields of these names
        are missing, null or empty, as a filtered delete (the server checks the condition as it deletes)."""
        uuids = list(dict.fromkeys(point_uuid(point_id) for point_id in ids))
        empty = [models.IsEmptyCondition(is_empty=models.PayloadField(key=name)) for name in only_if_empty]
        with self._using() as client:
            existing = client.retrieve(self.name, ids=uuids, with_payload=list(only_if_empty) or False)
            doomed = [
                record.id
                for record in existing
                if all(not (record.payload or {}).get(name) for name in only_if_empty)
            ]
            if doomed and empty:
                selector: Any = models.FilterSelector(
                    filter=models.Filter(must=[models.HasIdCondition(has_id=doomed), *empty])
                )
                client.delete(self.name, points_selector=selector, wait=True)
                # what the filtered delete removed: those of doomed that are gone now
                left = {record.id for record in client.retrieve(self.name, ids=doomed, with_payload=False)}
                doomed = [point for point in doomed if point not in left]
            elif doomed:
                client.delete(self.name, points_selector=models.PointIdsList(points=doomed), wait=True)
        return len(doomed)

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
        with self._using() as client:
            found = client.retrieve(
                self.name, ids=list(dict.fromkeys(uuids)), with_payload=_PAYLOAD, with_vectors=with_vectors
            )
        by_uuid = {str(point.id): self._record(point) for point in found}
        return [by_uuid[key] for key in uuids if key in by_uuid]

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> id of the image holding it, for the paths some image holds (the smallest id where several do).

        A MatchAny filter on `paths`, which has a keyword index on a server; embedded Qdrant scans its payloads."""
        asked = list(dict.fromkeys(str(path) for path in paths))
        found: dict[str, str] = {}
        for start in range(0, len(asked), _PATHS_BATCH):
            chunk = asked[start : start + _PATHS_BATCH]
            wanted = set(chunk)
            condition = models.Filter(must=[models.FieldCondition(key="paths", match=models.MatchAny(any=chunk))])
            offset: Any = None
            while True:
                with self._using() as client:
                    points, offset = client.scroll(
                        self.name,
                        scroll_filter=condition,
                        limit=_SCROLL_IDS_BATCH,
                        offset=offset,
                        with_payload=[ID_FIELD, "paths"],
                    )
                for point in points:
                    payload = point.payload or {}
                    image_id = str(payload[ID_FIELD])
                    for path in map(str, payload.get("paths") or []):
                        if path in wanted and (path not in found or image_id < found[path]):
                            found[path] = image_id
                if offset is None:
                    break
        return {path: found[path] for path in asked if path in found}

    def count(self, filter: Filter | None = None) -> int:
        """How many points match filter (all points for None)."""
        with self._using() as client:
            return client.count(self.name, count_filter=qdrant_filter(filter), exact=True).count

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
            with self._using() as client:  # per batch, so a long scroll does not hold writers back
                points, offset = client.scroll(
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
            with self._using() as client:
                points, offset = client.scroll(
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
            with self._using() as client:
                found = client.retrieve(self.name, ids=uuids, with_payload=_PAYLOAD, with_vectors=with_vectors)
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

        def fetch(client: QdrantClient, limit: int) -> list[models.ScoredPoint]:
            params = (
                models.SearchParams(hnsw_ef=max(self.hnsw_ef, limit), exact=self.manifest.index_type == "flat")
                if server
                else None
            )
            return client.query_points(
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

        def fetch(client: QdrantClient, limit: int) -> list[models.ScoredPoint]:
            return client.query_points(
                self.name,
                query=models.TextQuery(text=" ".join(terms)),
                using=TEXT_FIELD,
                query_filter=condition,
                limit=limit,
                with_payload=_PAYLOAD,
            ).points

        return self._ranked(fetch, need, need + 1)[offset:need]

    def _ranked(
        self, fetch: Callable[[QdrantClient, int], list[models.ScoredPoint]], need: int, pool: int
    ) -> list[Hit]:
        """The best `need` hits by (score desc, id): fetches more while the candidates end inside a run of ties."""
        with self._using() as client:
            while True:
                points = fetch(client, pool)
                if len(points) < pool or points[need - 1].score != points[-1].score:
                    break
                pool *= 2
        records = [(point.score, self._record(point)) for point in points]
        hits = [Hit(id=record.id, score=score, payload=record.payload) for score, record in records]
        hits.sort(key=lambda hit: (-hit.score, hit.id))
        return hits[:need]


def _connect_server(url: str | None, api_key: str | None, timeout: int) -> QdrantClient:
    # no version probe on connect: against an unreachable server it only adds a warning to our error
    return QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)


def _user_payload(stored: Payload) -> Payload:
    """The payload as the caller knows it: without the store's reserved fields."""
    return {name: value for name, value in stored.items() if name not in RESERVED_FIELDS}


def _settled(update: PayloadUpdate, stored: Payload) -> bool:
    """Whether the stored payload shows update's effect on its list fields (every added value there, every value
    removed and not added again gone), and keyword text true to its sources. Not `apply(p) == p`: a value both
    removed and added moves to the end each time it is applied."""
    current = _user_payload(stored)
    for name in {*update.remove, *update.add}:
        values = current.get(name)
        if name in update.add and not isinstance(values, list):
            return False
        held = values if isinstance(values, list) else []
        added = update.add.get(name, ())
        gone = [value for value in update.remove.get(name, ()) if value not in added]
        if any(value not in held for value in added) or any(value in held for value in gone):
            return False
    return stored.get(TEXT_FIELD) == payload_text(current)


def _still_holding(key: str, values: Mapping[str, Any]) -> models.Filter:
    """A filter matching point key only while each field holds the values given (as a set, with their count)."""
    must: list[Any] = [models.HasIdCondition(has_id=[key])]
    for name, value in values.items():
        if value is None or value == []:
            must.append(models.IsEmptyCondition(is_empty=models.PayloadField(key=name)))
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            count = models.ValuesCount(gte=len(value), lte=len(value))
            must.append(models.FieldCondition(key=name, values_count=count))
            must += [models.FieldCondition(key=name, match=models.MatchValue(value=item)) for item in set(value)]
        # any other value cannot be matched exactly: the write goes without a condition on it
    return models.Filter(must=must)
