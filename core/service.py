"""The service layer: every operation of vlsearch as a library call on settings-built components, returning typed
values (dataclasses) that the CLI renders and the API serialises.

One `Service` per process (or per test): it opens each collection once and loads each model once, caches them
under a lock, and closes them on `close()` (or leaving a `with` block). The cache belongs to one process: in a
forked child (a Celery pool child, a pre-forking server) a service builds its own stores and models on first use
and never touches the parent's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from core.container import Container, StoreKind, build_settings
from core.media import Thumbnail, check_thumbnail_side
from core.settings import Settings
from indexer.decode import check_image_bytes, decode_image, load_image
from indexer.errors import InvalidSetting, VlsearchError
from indexer.fetch import FetchedImage
from indexer.pipeline import FileFailure, IndexReport, content_id, index_images
from indexer.sources import IMAGE_EXTENSIONS, ImageBytes, ImageSource, iter_sources
from indexer.writer import detach_path
from reranker.model import VisionLanguageModel
from reranker.prompts import Turn
from reranker.scoring import VQA
from reranker.tags import verify_tags
from retriever.dupes import near_duplicate_groups
from retriever.errors import CollectionExists, InvalidQuery, PointNotFound, StorageFull
from retriever.query import SEARCH_MODES, Query, SearchMode, SortOrder, add_captions, search
from retriever.store import Filter, Hit, Payload, Record, VectorStore, checked_query_vector, copy_points
from retriever.tagging import (
    Tag,
    TagReport,
    TagScorer,
    Verifier,
    default_vocabulary,
    export_tags,
    load_vocabulary,
    tag_records,
)

__all__ = [
    "SEARCH_MODES",
    "Answer",
    "CaptionView",
    "CollectionInfo",
    "DeleteResult",
    "DropResult",
    "DuplicateGroup",
    "DuplicateMember",
    "Filter",
    "HitView",
    "IndexResult",
    "InvalidQuery",
    "InvalidSetting",
    "MigrationResult",
    "Overview",
    "PointNotFound",
    "Query",
    "QueryImage",
    "SearchMode",
    "SearchResult",
    "Service",
    "SortOrder",
    "StorageFull",
    "StoreKind",
    "Thumbnail",
    "Turn",
    "VlsearchError",
]

logger = logging.getLogger(__name__)
ImageInput = str | Path | bytes | Image.Image  # a file, a stored id (str), uploaded bytes or a decoded image


@dataclass(frozen=True)
class _VqaScorer:
    """The generative model's P("Yes") (method vqa), whatever its rerank method: what min_relevance bounds."""

    model: VisionLanguageModel

    def score(self, query: str, images: Sequence[Image.Image]) -> list[float]:
        return self.model.score(query, images, method=VQA)


# --- values returned -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HitView:
    """One search result as plain data: scores, the image's files and metadata, its cached captions, and the
    caption of the generative model this request used (when it asked for captions)."""

    id: str
    score: float  # CLIP cosine (clip mode), BM25 (keyword) or the fused rank score (hybrid)
    rerank_score: float | None
    final_score: float | None
    path: str | None  # the first of paths
    paths: list[str]
    width: int | None
    height: int | None
    bytes: int | None
    format: str | None
    tags: list[str]
    captions: dict[str, str]  # {model identity: caption}
    caption: str | None = None
    source_name: str | None = None  # the name an image indexed from bytes came under
    relevance: float | None = None  # P("Yes") of the generative model, when the query set min_relevance
    taken: str | None = None  # when the picture was taken (payload `taken`, "YYYY-MM-DDTHH:MM:SS")

    @classmethod
    def of(cls, hit: Hit, caption_model: str | None = None) -> HitView:
        payload = hit.payload
        captions = dict(payload.get("captions") or {})
        return cls(
            id=hit.id,
            score=float(hit.score),
            rerank_score=hit.rerank_score,
            final_score=hit.final_score,
            path=hit.path,
            paths=[str(p) for p in payload.get("paths", [])],
            width=payload.get("width"),
            height=payload.get("height"),
            bytes=payload.get("bytes"),
            format=payload.get("format"),
            tags=list(payload.get("tags", [])),
            captions=captions,
            caption=captions.get(caption_model) if caption_model else None,
            source_name=payload.get("source_name"),
            relevance=hit.relevance,
            taken=payload.get("taken"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    collection: str
    hits: list[HitView]
    caption_model: str | None = None  # identity of the model whose captions `HitView.caption` holds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IndexResult:
    collection: str
    count: int  # images in the collection afterwards
    report: IndexReport
    ids: list[str | None] | None = None  # index_bytes: each item's image id (None where it failed)

    def to_dict(self) -> dict[str, Any]:
        data = {**self.report.to_dict(), "collection": self.collection, "count": self.count}
        if self.ids is not None:
            data["ids"] = self.ids
        return data


@dataclass(frozen=True)
class DuplicateMember:
    id: str
    paths: list[str]
    source_name: str | None = None


@dataclass(frozen=True)
class DuplicateGroup:
    members: list[DuplicateMember]


@dataclass(frozen=True)
class CollectionInfo:
    collection: str
    count: int
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Overview:
    data_dir: str
    collections: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeleteResult:
    collection: str
    deleted: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DropResult:
    collection: str
    dropped: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaptionView:
    id: str
    path: str | None
    caption: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    image: str  # as given: a file, an id, or the name of uploaded bytes
    question: str
    answer: str
    turns_used: int = 0  # earlier turns of the conversation the model read (the newest)
    turns_dropped: int = 0  # the oldest earlier turns left out to fit the model's context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MigrationResult:
    collection: str
    source: StoreKind
    target: StoreKind
    copied: int
    source_count: int
    target_count: int
    seconds: float


@dataclass(frozen=True)
class QueryImage:
    """The image part of a query: a decoded image, or a stored image by id."""

    image: Image.Image | None = None
    image_id: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"image": self.image} if self.image is not None else {"image_id": self.image_id}


# --- the service -----------------------------------------------------------------------------------------------


@dataclass
class _ProcessState:
    """What one process has opened and loaded; a forked child starts a new one."""

    pid: int
    container: Container
    lock: threading.RLock = field(default_factory=threading.RLock)
    stores: dict[tuple[StoreKind, str], VectorStore] = field(default_factory=dict)
    # tag scorers by (encoder identity, vocabulary file and its mtime, threshold): label embeddings made once
    scorers: dict[tuple[Any, ...], TagScorer] = field(default_factory=dict)


_SERVICES: weakref.WeakSet[Service] = weakref.WeakSet()


def _forget_in_forked_child() -> None:
    # torch's CPU thread pool (GNU OpenMP) does not survive a fork: a child that runs a parallel op after the parent
    # ran one hangs in gomp_team_barrier_wait_end (pytorch/pytorch#17199). One intra-op thread per forked child
    # (a prefork pool has one child per core anyway) never enters an OpenMP region.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    for service in list(_SERVICES):
        service._reset()


os.register_at_fork(after_in_child=_forget_in_forked_child)


class Service:
    """vlsearch's operations on the collections and models that `settings` name (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._state = _ProcessState(os.getpid(), Container(settings))
        _SERVICES.add(self)

    @classmethod
    def from_env(cls, **overrides: Any) -> Service:
        """Settings from the environment, `overrides` on top; InvalidSetting names a variable that cannot work."""
        return cls(build_settings(**overrides))

    def __enter__(self) -> Service:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the error in flight is the one to report: closing after it often fails alike (full disk)
            logger.warning("closing the collections after %s failed too", type(error).__name__, exc_info=True)

    def _reset(self) -> None:
        # After a fork: the parent's stores and models (threads, SQLite connections, CUDA) are not ours to use or
        # close; the child opens its own on first use.
        self._state = _ProcessState(os.getpid(), Container(self.settings))

    def _current(self) -> _ProcessState:
        if self._state.pid != os.getpid():  # forked without register_at_fork (e.g. os.fork from C)
            self._reset()
        return self._state

    @property
    def container(self) -> Container:
        """The components of this process (encoders cached; the generative model cached by reranker.get_model)."""
        return self._current().container

    def close(self) -> None:
        """Close every store this process opened (each saves what it holds); the service may be used again."""
        state = self._current()
        with state.lock:
            stores, state.stores = list(state.stores.values()), {}
        errors: list[BaseException] = []
        for store in stores:
            try:
                store.close()
            except Exception as error:  # close the others all the same
                errors.append(error)
        if errors:
            raise errors[0]

    # --- stores ----------------------------------------------------------------------------------------------

    def store(self, collection: str | None = None, kind: StoreKind | None = None) -> VectorStore:
        """An existing collection, opened once per process (CollectionNotFound names it when missing)."""
        name = collection or self.settings.collection
        kind = kind or self.settings.store
        state = self._current()
        with state.lock:
            store = state.stores.get((kind, name))
            if store is None:
                store = state.container.open_store(name, kind)
                state.stores[(kind, name)] = store
            return store

    def _writable_store(self, collection: str | None, encoder: Any) -> VectorStore:
        """The collection for indexing with encoder: created when missing; another encoder's is refused."""
        name = collection or self.settings.collection
        kind = self.settings.store
        state = self._current()
        with state.lock:
            store = state.stores.get((kind, name))
            converts = state.container.index_type_chosen()
            if store is not None and not (converts and store.manifest.index_type != self.settings.index_type):
                store.manifest.check_encoder(encoder.name, encoder.identity, encoder.dim)
                return store
            if store is not None:  # reopened with the manifest, which converts the index type
                state.stores.pop((kind, name))
                store.close()
            store = state.container.create_or_open_store(name, encoder)
            state.stores[(kind, name)] = store
            return store

    def _forget(self, name: str) -> None:
        """Close this process's stores of collection name (before it is dropped or migrated)."""
        state = self._current()
        with state.lock:
            gone = [key for key in state.stores if key[1] == name]
            stores = [state.stores.pop(key) for key in gone]
        for store in stores:
            store.close()

    def list_collections(self) -> list[str]:
        return self.container.list_collections()

    # --- indexing --------------------------------------------------------------------------------------------

    def index(
        self,
        paths: Sequence[Path | str],
        collection: str | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        on_total: Callable[[int], None] | None = None,
        on_file: Callable[[], None] | None = None,
    ) -> IndexResult:
        """Index files and folders (recursively): new images embedded, known ones skipped, copies recorded as more
        paths, changed files re-embedded. on_total gets the number of files before the run, on_file each one."""
        given = [Path(p) for p in paths]
        missing = [str(p) for p in given if not p.exists() and not p.is_symlink()]
        if missing:
            raise VlsearchError(f"no such file or folder: {', '.join(missing)}")
        files = list(iter_sources(given))
        if on_total is not None:
            on_total(len(files))
        return self._index(files, collection, batch_size, workers, on_file)

    def index_bytes(
        self,
        items: Sequence[tuple[str, bytes]] | Sequence[ImageBytes],
        collection: str | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> IndexResult:
        """Index images given as bytes (uploads, fetched images) with the names they came under; the bytes are
        kept content-addressed under the data dir, so rerank, captions and thumbnails can load them. Each item is
        checked against the same limits as a file; `ids` in the result give each item's image id."""
        sources = [item if isinstance(item, ImageBytes) else ImageBytes(item[0], item[1]) for item in items]
        result = self._index(sources, collection, batch_size, workers, None)
        ids = [content_id(source.data) for source in sources]
        store = self.store(collection)
        present = {record.id for record in store.get(list(dict.fromkeys(ids)))} if ids else set()
        return replace(result, ids=[image_id if image_id in present else None for image_id in ids])

    def fetch(self, url: str) -> FetchedImage:
        """The bytes at an image URL, through the safe fetcher (FetchRefused before any connection to an address
        that is not public, unless VLSEARCH_FETCH_ALLOW names it; FetchFailed, ImageTooLarge)."""
        return self.container.fetcher().fetch(url)

    def index_urls(
        self, urls: Sequence[str], collection: str | None = None, *, batch_size: int | None = None
    ) -> IndexResult:
        """Index images at URLs: each fetched safely, then indexed from its bytes under its URL (`source_name`). A
        URL refused, unreachable or too large fails alone, listed in the report with its reason."""
        fetched: list[ImageBytes] = []
        refused: list[FileFailure] = []
        fetcher = self.container.fetcher()
        for url in urls:
            try:
                fetched.append(ImageBytes(url, fetcher.fetch(url).data))
            except VlsearchError as error:
                refused.append(FileFailure(url, type(error).__name__, str(error)))
        result = self.index_bytes(fetched, collection, batch_size=batch_size) if fetched else None
        report = result.report if result is not None else IndexReport()
        report = replace(report, files=len(urls), failed=[*refused, *report.failed])
        name = collection or self.settings.collection
        if result is not None:
            return replace(result, report=report, ids=None)
        return IndexResult(name, self.store(name).count() if name in self.list_collections() else 0, report)

    def _index(
        self,
        sources: Iterable[ImageSource],
        collection: str | None,
        batch_size: int | None,
        workers: int | None,
        on_file: Callable[[], None] | None,
    ) -> IndexResult:
        container = self.container
        encoder = container.encoder()
        store = self._writable_store(collection, encoder)
        try:
            report = index_images(
                sources,
                encoder,
                store,
                batch_size=batch_size or self.settings.batch_size,
                workers=workers or self.settings.decode_workers,
                limits=container.decode_limits,
                on_file=on_file,
                blobs=container.blobs,
            )
        except OSError as error:  # the stores type their own; this is the kept bytes of uploads (the blob store)
            if error.errno != errno.ENOSPC:
                raise
            raise StorageFull(
                f"the disk holding the data dir ({self.settings.data_dir}, VLSEARCH_DATA_DIR) is full ({error}): "
                f"collection {store.name!r} keeps what was indexed before; free space and index again"
            ) from error
        return IndexResult(store.name, store.count(), report)

    # --- queries ---------------------------------------------------------------------------------------------

    def query_image(self, value: ImageInput) -> QueryImage:
        """The image of a query: a decoded image or bytes as they are; a string or path naming an existing file is
        that file, decoded safely; any other string is a stored image id."""
        limits = self.container.decode_limits
        if isinstance(value, Image.Image):
            return QueryImage(image=value)
        if isinstance(value, bytes):
            data = check_image_bytes(value, "<upload>", limits)
            return QueryImage(image=decode_image(data, "<upload>", limits).image)
        path = Path(value)
        if path.exists():
            return QueryImage(image=load_image(path, limits).image)
        if isinstance(value, Path) or "/" in value or path.suffix.lower() in IMAGE_EXTENSIONS:
            raise VlsearchError(f"no such image file: {value}")
        return QueryImage(image_id=value)

    def search(self, query: Query, collection: str | None = None) -> SearchResult:
        """Hits of a query (text, image or both; clip, keyword or hybrid), reranked and captioned when it asks."""
        store = self.store(collection)
        container = self.container
        if query.image_id is not None and not store.get([query.image_id]):
            raise PointNotFound(f"no image with id {query.image_id!r} in collection {store.name!r}")
        encoder = container.encoder_for(store)
        vlm = self._vlm() if query.reranks or query.captions else None
        relevance = None
        if vlm is not None and query.min_relevance is not None:
            relevance = vlm if vlm.score_method == VQA else _VqaScorer(vlm)  # the rerank scores are reused when vqa
        hits = search(
            store,
            encoder,
            query,
            max_k=self.settings.max_k,
            scorer=vlm,
            captioner=vlm,
            load_hit_image=container.hit_image_loader(vlm),
            image_workers=self.settings.image_workers,
            relevance_scorer=relevance,
        )
        caption_model = vlm.identity if vlm is not None and query.captions else None
        return SearchResult(store.name, [HitView.of(hit, caption_model) for hit in hits], caption_model)

    def search_vector(
        self,
        vector: Sequence[float] | np.ndarray,
        collection: str | None = None,
        *,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        filter: Filter | None = None,
    ) -> SearchResult:
        """Hits of a query vector given as it is (an embedding a client made with the collection's encoder): the
        clip ranking of `search` without encoding a query. It is normalised here; the store checks its dim."""
        if not 1 <= k <= self.settings.max_k:
            raise InvalidQuery(f"k must be between 1 and {self.settings.max_k}, got {k}")
        store = self.store(collection)
        query = checked_query_vector(np.asarray(vector, dtype=np.float32), store.manifest, repr(store.name))
        norm = float(np.linalg.norm(query))
        if norm < 1e-6:
            raise InvalidQuery("the query vector is zero: it points nowhere to search")
        hits = store.search(query / norm, k, filter, min_score, offset)
        return SearchResult(store.name, [HitView.of(hit) for hit in hits])

    def similar(
        self,
        image: ImageInput,
        collection: str | None = None,
        *,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        filter: Filter | None = None,
    ) -> SearchResult:
        """Images that look like this one (a stored id never returns itself)."""
        query = Query(k=k, offset=offset, min_score=min_score, filter=filter, **self.query_image(image).fields())
        return self.search(query, collection)

    def duplicates(self, collection: str | None = None, threshold: float | None = None) -> list[DuplicateGroup]:
        """Near-duplicate groups (largest first); an image stored under several paths is a group of its own."""
        store = self.store(collection)
        limit = threshold if threshold is not None else self.settings.dupes_threshold
        return [
            DuplicateGroup(
                [
                    DuplicateMember(r.id, [str(p) for p in r.payload.get("paths", [])], r.payload.get("source_name"))
                    for r in group
                ]
            )
            for group in near_duplicate_groups(store, limit)
        ]

    # --- collections -----------------------------------------------------------------------------------------

    def info(self, collection: str | None = None) -> CollectionInfo:
        store = self.store(collection)
        return CollectionInfo(store.name, store.count(), json.loads(store.manifest.to_json()))  # keys sorted

    def overview(self) -> Overview:
        return Overview(str(self.settings.data_dir), self.list_collections())

    def delete(self, targets: Sequence[str], collection: str | None = None) -> DeleteResult:
        """Remove images by id, or a path from its image (which goes once no path, nor kept bytes, is left).

        Paths are looked up through the store's path index (ids_by_path), never by reading the collection."""
        if not targets:
            raise InvalidQuery("give image ids or paths to delete, or --drop for the whole collection")
        store = self.store(collection)
        forms: dict[str, str] = {}  # a path as it may be recorded -> the target it came from
        for target in targets:
            forms.setdefault(os.path.abspath(target), target)
            forms.setdefault(str(Path(target).resolve()), target)
        by_path = store.ids_by_path(list(forms))
        as_paths = {forms[path] for path in by_path}
        ids = [target for target in dict.fromkeys(targets) if target not in as_paths]
        removed = store.delete([record.id for record in store.get(ids)]) if ids else 0
        for path, image_id in by_path.items():
            removed += int(detach_path(store, image_id, path))
        store.save()
        return DeleteResult(store.name, removed, store.count())

    def drop(self, collection: str | None = None) -> DropResult:
        """Delete a whole collection."""
        name = collection or self.settings.collection
        self._forget(name)
        self.container.drop_collection(name)
        return DropResult(name)

    def create_collection(self, name: str, model: str | None = None, pretrained: str | None = None) -> CollectionInfo:
        """A new, empty collection for an encoder (default: the settings'); CollectionExists if the name is taken."""
        if name in self.list_collections():
            raise CollectionExists(f"collection {name!r} exists already")
        encoder = self.container.encoder(model, pretrained) if model else self.container.encoder()
        self._writable_store(name, encoder)
        return self.info(name)

    def migrate(
        self, source: StoreKind, target: StoreKind, collection: str | None = None, batch_size: int = 1000
    ) -> MigrationResult:
        """Copy a collection with its vectors, payloads and manifest to the other store, then check the counts.
        Running it again finishes an interrupted copy. An IVF-PQ collection becomes HNSW on Qdrant."""
        if source == target:
            raise VlsearchError(f"--from and --to are both {source}: nothing to migrate")
        name = collection or self.settings.collection
        self._forget(name)
        container = self.container
        started = time.perf_counter()
        origin = container.open_store(name, kind=source)
        try:
            index_type = "hnsw" if target == "qdrant" and origin.manifest.index_type == "ivfpq" else None
            manifest = replace(origin.manifest, store=target, index_type=index_type or origin.manifest.index_type)
            destination = container.store(name, manifest, target)
            try:
                report = copy_points(origin, destination, batch_size)
            finally:
                destination.close()
        finally:
            origin.close()
        seconds = time.perf_counter() - started
        return MigrationResult(
            name, source, target, report.copied, report.source_count, report.target_count, round(seconds, 3)
        )

    # --- the generative model --------------------------------------------------------------------------------

    def _vlm(self) -> VisionLanguageModel:
        return self.container.vlm()

    def caption(
        self, ids: Sequence[str] | None = None, collection: str | None = None, *, refresh: bool = False
    ) -> list[CaptionView]:
        """Caption stored images (the ids given, else every image) with the generative model; captions are cached
        in the payload per model and reused unless refresh. Written as it goes: an interrupted run keeps them."""
        store = self.store(collection)
        generator = self._vlm()
        if ids:
            records = store.get(list(ids))
            unknown = sorted(set(ids) - {record.id for record in records})
            if unknown:
                raise PointNotFound(f"no image with id {', '.join(unknown)} in collection {store.name!r}")
        else:
            records = list(store.scroll())
        hits = [Hit(id=r.id, score=0.0, payload=r.payload) for r in records]
        if refresh:  # forget this model's captions only; other models' stay cached
            for hit in hits:
                kept = {k: v for k, v in (hit.payload.get("captions") or {}).items() if k != generator.identity}
                hit.payload = {**hit.payload, "captions": kept}
        loader = self.container.hit_image_loader(generator)
        chunk = max(1, self.settings.vlm_chunk_size) * 4
        for start in range(0, len(hits), chunk):
            add_captions(store, hits[start : start + chunk], generator, loader, workers=self.settings.image_workers)
        return [CaptionView(hit.id, hit.path, hit.payload["captions"][generator.identity]) for hit in hits]

    def point_ids(self, collection: str | None = None) -> list[str]:
        """Every stored image id, in id order (what a job splits into chunks)."""
        return [record.id for record in self.store(collection).scroll()]

    def _scorer(self, store: VectorStore, vocabulary: str | Path | None, threshold: float | None) -> TagScorer:
        encoder = self.container.encoder_for(store)
        path = Path(vocabulary) if vocabulary is not None else None
        key = (encoder.identity, str(path), path.stat().st_mtime_ns if path and path.exists() else None, threshold)
        state = self._current()
        with state.lock:
            scorer = state.scorers.get(key)
            if scorer is None:
                labels = load_vocabulary(path) if path is not None else default_vocabulary()
                scorer = state.scorers[key] = TagScorer(encoder, labels, threshold)
            return scorer

    def tag(
        self,
        ids: Sequence[str],
        collection: str | None = None,
        *,
        vocabulary: str | Path | None = None,
        threshold: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        verify: bool = False,
    ) -> TagReport:
        """Zero-shot tags for the stored images of ids, from their stored vectors (no image decoded again), with the
        collection's encoder and a vocabulary file (default: models/vocabularies/common.txt); written as `tags`.
        With verify, each image's best candidates are put to the generative model, and only what it confirms is
        kept (images are decoded for that; one that is gone keeps its payload and is reported unverified)."""
        store = self.store(collection)
        scorer = self._scorer(store, vocabulary, threshold)
        verifier = self._tag_verifier() if verify else None
        return tag_records(store, scorer, ids, should_stop=should_stop, verify=verifier)

    def _tag_verifier(self) -> Verifier:
        generator = self._vlm()
        load = self.container.hit_image_loader(generator)

        def loaded(record: Record) -> Image.Image | None:
            try:
                return load(Hit(id=record.id, score=0.0, payload=record.payload))
            except VlsearchError:
                return None

        def verify(records: Sequence[Record], candidates: list[list[Tag]]) -> list[list[Tag] | None]:
            workers = max(1, min(len(records), self.settings.image_workers))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                images = list(pool.map(loaded, records))
            confirmed: list[list[Tag] | None] = []
            for image, tags in zip(images, candidates, strict=True):
                if image is None:
                    confirmed.append(None)
                    continue
                kept = set(verify_tags(generator, image, [tag.label for tag in tags]))
                confirmed.append([tag for tag in tags if tag.label in kept])
            return confirmed

        return verify

    def export_tags(self, output: Any, format: str = "jsonl", collection: str | None = None) -> int:
        """Every image's id, paths and tags with scores as JSONL or CSV into output; the number of images."""
        return export_tags(self.store(collection), format, output)

    def uncaptioned(self, ids: Sequence[str], collection: str | None = None) -> list[str]:
        """Those of ids that hold no caption of the current generative model."""
        identity = self._vlm().identity
        records = self.store(collection).get(list(ids))
        return [record.id for record in records if identity not in (record.payload.get("captions") or {})]

    def ask(
        self, image: ImageInput, question: str, collection: str | None = None, history: Sequence[Turn] = ()
    ) -> Answer:
        """The generative model's answer to a question about one image (a file, a stored id, bytes), after the
        earlier (question, answer) turns `history` about it, oldest first; the oldest that do not fit are dropped."""
        label = image if isinstance(image, str) else str(image) if isinstance(image, Path) else "<upload>"
        picture = self._image(image, collection, neither=True)
        reply = self._vlm().converse(picture, question, history)
        return Answer(label, question, reply.answer, reply.turns_used, reply.turns_dropped)

    def resolve_image(self, image: ImageInput, collection: str | None = None) -> Image.Image:
        """The picture `ask` reads for `image` (a file, a stored id, bytes), decoded once: a conversation's."""
        return self._image(image, collection, neither=True)

    # --- images ----------------------------------------------------------------------------------------------

    def _record(self, image_id: str, collection: str | None, what: str | None = None) -> Record:
        store = self.store(collection)
        records = store.get([image_id])
        if not records:
            raise PointNotFound(what or f"no image with id {image_id!r} in collection {store.name!r}")
        return records[0]

    def _image(self, image: ImageInput, collection: str | None, neither: bool = False) -> Image.Image:
        source = self.query_image(image)
        if source.image is not None:
            return source.image
        assert source.image_id is not None
        store_name = collection or self.settings.collection
        what = (
            f"{source.image_id} is neither an image file nor an image id in collection {store_name!r}"
            if neither
            else None
        )
        record = self._record(source.image_id, collection, what)
        return self.container.load_hit_image(Hit(id=record.id, score=0.0, payload=record.payload))

    def load_image(self, image_id: str, collection: str | None = None) -> Image.Image:
        """A stored image, decoded safely from its file or its kept bytes."""
        record = self._record(image_id, collection)
        return self.container.load_hit_image(Hit(id=record.id, score=0.0, payload=record.payload))

    def payload(self, image_id: str, collection: str | None = None) -> Payload:
        return dict(self._record(image_id, collection).payload)

    def thumbnail(self, image_id: str, side: int = 256, collection: str | None = None) -> Thumbnail:
        """A small JPEG of a stored image (longest side at most `side`, orientation applied), made once and then
        read from the cache under the data dir."""
        check_thumbnail_side(side)
        record = self._record(image_id, collection)
        cache = self.container.thumbnails
        cached = cache.cached(record.id, side)
        if cached is not None:
            return cached
        picture = self.container.load_hit_image(Hit(id=record.id, score=0.0, payload=record.payload), side)
        return cache.store(record.id, side, picture)
