"""The indexing loop: reader threads -> lookups by path and id -> decoder threads -> encoder -> store writer.

Runs in the CLI, a Celery task (on one chunk) and tests. It reads from the store only what its sources need
(`ids_by_path` for their paths, `get` for their ids), never the whole collection, and changes stored payloads
only by merged field updates (`PayloadUpdate`), so several processes may index into one collection at once.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, TypeVar

import torch

from indexer.decode import DecodeLimits, check_image_bytes, decode_image, read_image
from indexer.encoder import ClipEncoder
from indexer.errors import DecodeError, UnreadableFile, UnsupportedImage
from indexer.payloads import PayloadUpdate, taken_form
from indexer.sources import ImageBytes, ImageSource, RefusedFile, path_text
from indexer.writer import BlobSink, ImageWriter, PayloadDict, detach_path

__all__ = ["FileFailure", "IndexReport", "content_id", "detach_path", "index_images"]

NAME_NOT_UTF8 = "its name is not valid UTF-8, so it cannot be recorded: rename the file to index it"
ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach, and the id fits a UUID (Qdrant point ids)
_T = TypeVar("_T")
_R = TypeVar("_R")


def content_id(data: bytes) -> str:
    """The id of an image: derived from its bytes, so re-indexing is idempotent and exact duplicates share it."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX_CHARS]


@dataclass
class FileFailure:
    path: str  # the file, or the name bytes came under
    error: str  # exception type, e.g. "CorruptImage"
    reason: str


@dataclass
class IndexReport:
    files: int = 0
    added: int = 0  # new images embedded and stored
    duplicates: int = 0  # files whose bytes were already stored under another path: recorded as one more path
    unchanged: int = 0  # files already stored under this very path (bytes: already kept)
    removed: int = 0  # images dropped because their only path now holds other bytes
    failed: list[FileFailure] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Read:
    key: str  # the path as recorded, or the name bytes came under
    path: str | None  # None for bytes
    data: bytes
    id: str
    mtime: float | None


@dataclass
class _Decoded:
    payload: PayloadDict
    pixels: torch.Tensor


@dataclass
class _Group:
    """Sources read in one go, with one lookup by path and one by id for all of them."""

    items: list[tuple[ImageSource, _Read | BaseException]]
    known: Mapping[str, str]  # path -> id of the stored image holding it
    stored: dict[str, Mapping[str, Any]]  # id -> payload as stored, for the group's ids that exist
    decodes: dict[str, Future[_Decoded]]  # ids first met in this group that are not stored: being decoded


@dataclass
class _Batch:
    ids: list[str] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    payloads: list[PayloadDict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the source that made each entry new
    first_paths: list[str | None] = field(default_factory=list)  # its path (None: it was bytes)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, read: _Read, decoded: _Decoded) -> None:
        self.ids.append(read.id)
        self.pixels.append(decoded.pixels)
        self.payloads.append(decoded.payload)
        self.keys.append(read.key)
        self.first_paths.append(read.path)

    def payload(self, image_id: str) -> PayloadDict:
        return self.payloads[self.ids.index(image_id)]

    def drop_path(self, image_id: str, path: str) -> bool:
        """Forget path of a pending entry; the entry goes when nothing is left (then True)."""
        at = self.ids.index(image_id)
        payload = self.payloads[at]
        payload["paths"] = [p for p in payload["paths"] if p != path]
        if payload["paths"] or payload.get("blob"):
            return False
        for column in self._columns():
            del column[at]
        return True

    def clear(self) -> None:
        for column in self._columns():
            column.clear()

    def _columns(self) -> tuple[list[Any], ...]:
        return (self.ids, self.pixels, self.payloads, self.keys, self.first_paths)


def index_images(
    sources: Iterable[ImageSource],
    encoder: ClipEncoder,
    store: ImageWriter,
    batch_size: int = 32,
    workers: int = 2,
    limits: DecodeLimits | None = None,
    on_file: Callable[[], None] | None = None,
    blobs: BlobSink | None = None,
) -> IndexReport:
    """Index image files (and images given as bytes, kept in `blobs`) into store; per-source failures are
    collected in the report and the run goes on."""
    started = time.perf_counter()
    report = IndexReport()
    group_size = max(batch_size, 16)
    window = 2 * group_size + workers
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        run = _Run(encoder, store, batch_size, limits or DecodeLimits(), blobs, report, pool)
        pending: deque[_Group] = deque()
        # Two groups in flight: while one is encoded and written, the next one decodes in the pool.
        for items in _chunks(_in_order(pool, run.read, sources, window), group_size):
            pending.append(run.plan(items))
            if len(pending) > 1:
                run.finish(pending.popleft(), on_file)
        while pending:
            run.finish(pending.popleft(), on_file)
        run.flush()
        run.apply_updates()
    store.save()
    report.seconds = time.perf_counter() - started
    return report


class _Run:
    """The bookkeeping of one index_images call (the main thread's; read and decode run in the pool)."""

    def __init__(
        self,
        encoder: ClipEncoder,
        store: ImageWriter,
        batch_size: int,
        limits: DecodeLimits,
        blobs: BlobSink | None,
        report: IndexReport,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.encoder, self.store, self.batch_size, self.limits = encoder, store, batch_size, limits
        self.blobs, self.report, self.pool = blobs, report, pool
        self.preprocess, self.draft_size = encoder.preprocess, encoder.image_size
        self.batch = _Batch()
        self.path_ids: dict[str, str] = {}  # paths met in this run -> the id they hold now
        self.planned: set[str] = set()  # ids whose decoding this run started
        self.stored: set[str] = set()  # ids this run knows to be stored (written by it, or found at a flush)
        self.deleted: set[str] = set()  # ids this run deleted
        self.recorded: dict[str, set[str]] = {}  # id -> paths known to be recorded in its stored payload
        self.with_blob: set[str] = set()  # stored ids whose bytes are kept
        self.updates: dict[str, PayloadUpdate] = {}  # queued field updates, written together
        self.update_keys: dict[str, list[str]] = {}  # the sources each queued update records (duplicates)

    # --- in the pool ---------------------------------------------------------------------------------------

    def read(self, source: ImageSource) -> _Read:
        if isinstance(source, ImageBytes):
            if self.blobs is None:
                raise UnsupportedImage(source.name, "images given as bytes need a place to keep them (blobs)")
            data = check_image_bytes(source.data, source.name, self.limits)
            return _Read(source.name, None, data, content_id(data), None)
        if isinstance(source, RefusedFile):
            raise UnreadableFile(path_text(source.path), source.reason)
        if path_text(source) != str(source):  # SQLite, JSON and the terminal take text, not a name's raw bytes
            raise UnreadableFile(path_text(source), NAME_NOT_UTF8)
        data, info = read_image(source, self.limits)
        return _Read(str(source), str(source), data, content_id(data), info.st_mtime)

    def decode(self, read: _Read) -> _Decoded:
        decoded = decode_image(read.data, source=read.key, limits=self.limits, draft_size=self.draft_size)
        payload: PayloadDict = {
            "paths": [read.path] if read.path is not None else [],
            "width": decoded.width,
            "height": decoded.height,
            "bytes": len(read.data),
            "format": decoded.format,
            # EXIF DateTimeOriginal, else the file's mtime (UTC), else (bytes) now: see indexer/payloads.py
            "taken": decoded.taken or taken_form(
                datetime.fromtimestamp(read.mtime, UTC) if read.mtime is not None else datetime.now(UTC)
            ),
        }
        if read.path is not None:
            payload["mtime"] = read.mtime
        else:
            payload["blob"] = self._keep(read)
            payload["source_name"] = read.key
        return _Decoded(payload, self.preprocess(decoded.image))

    def _keep(self, read: _Read) -> str:
        assert self.blobs is not None  # read() refuses bytes without blobs
        return self.blobs.put(read.id, read.data)

    # --- in the main thread --------------------------------------------------------------------------------

    def plan(self, items: list[tuple[ImageSource, _Read | BaseException]]) -> _Group:
        """Look the group's paths and ids up (two store reads) and start decoding what is not stored."""
        reads = [outcome for _, outcome in items if isinstance(outcome, _Read)]
        paths = list(dict.fromkeys(r.path for r in reads if r.path is not None and r.path not in self.path_ids))
        known = self.store.ids_by_path(paths) if paths else {}
        ids = list(dict.fromkeys(r.id for r in reads if r.id not in self.planned and r.id not in self.stored))
        stored = {point.id: point.payload for point in self.store.get(ids)} if ids else {}
        decodes: dict[str, Future[_Decoded]] = {}
        for read in reads:
            if read.id not in stored and read.id not in self.planned and read.id not in self.stored:
                self.planned.add(read.id)
                decodes[read.id] = self.pool.submit(self.decode, read)
        return _Group(items, known, stored, decodes)

    def finish(self, group: _Group, on_file: Callable[[], None] | None) -> None:
        for source, outcome in group.items:
            self.report.files += 1
            if isinstance(outcome, BaseException):
                self._failed(_key(source), outcome)
            else:
                self._resolve(outcome, group)
            if on_file is not None:
                on_file()

    def _resolve(self, read: _Read, group: _Group) -> None:
        image_id = read.id
        snapshot = group.stored.get(image_id)
        if snapshot is not None and image_id not in self.deleted:
            self.recorded.setdefault(image_id, set()).update(snapshot.get("paths") or [])
            if snapshot.get("blob"):
                self.with_blob.add(image_id)
            self.stored.add(image_id)
        decoded: _Decoded | None = None
        if image_id not in self.batch and image_id not in self.stored:
            future = group.decodes.pop(image_id, None)
            try:
                # No future: stored at the lookup but deleted since (its only path changed bytes earlier in this
                # run), or its decoding failed in an earlier group: decode again.
                decoded = future.result() if future is not None else self.decode(read)
            except Exception as error:  # one bad file fails alone; the run goes on
                if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # keeping its bytes met a full disk:
                    raise  # so would every other file's
                self._failed(read.key, error)
                return
        if read.path is not None:
            previous = self.path_ids.get(read.path, group.known.get(read.path))
            if previous is not None and previous != image_id:  # new bytes at a known path
                self._detach(previous, read.path)
            self.path_ids[read.path] = image_id
        if decoded is not None:
            self.batch.add(read, decoded)
            if len(self.batch) >= self.batch_size:
                self.flush()
        elif image_id in self.batch:
            if _merge_into(self.batch.payload(image_id), read, self._keep):
                self.report.duplicates += 1
            else:
                self.report.unchanged += 1
        else:
            self._attach(image_id, read)

    def _attach(self, image_id: str, read: _Read) -> None:
        """Record one more source of a stored image (a queued field update), unless it is recorded already."""
        if read.path is not None:
            recorded = self.recorded.setdefault(image_id, set())
            if read.path in recorded:
                self.report.unchanged += 1
                return
            recorded.add(read.path)
            self._queue(image_id, PayloadUpdate(add={"paths": (read.path,)}), [read.key])
        else:
            if image_id in self.with_blob:
                self.report.unchanged += 1
                return
            self.with_blob.add(image_id)
            self._queue(image_id, PayloadUpdate(set={"blob": self._keep(read), "source_name": read.key}), [read.key])

    def _detach(self, image_id: str, path: str) -> None:
        if image_id in self.batch:
            if self.batch.drop_path(image_id, path):
                self.planned.discard(image_id)
            return
        self.apply_updates()  # a queued path of this image must count before the image may go
        self.recorded.get(image_id, set()).discard(path)
        if detach_path(self.store, image_id, path):
            self.report.removed += 1
            self.deleted.add(image_id)
            self.stored.discard(image_id)
            self.planned.discard(image_id)
            self.recorded.pop(image_id, None)
            self.with_blob.discard(image_id)

    def _queue(self, image_id: str, update: PayloadUpdate, keys: list[str]) -> None:
        queued = self.updates.get(image_id)
        self.updates[image_id] = update if queued is None else queued.merged(update)
        self.update_keys.setdefault(image_id, []).extend(keys)

    def apply_updates(self) -> None:
        """Write the queued field updates in one call; sources of an image deleted meanwhile by another process
        fail (nothing would hold them), the others count as duplicates."""
        if not self.updates:
            return
        updates, keys = self.updates, self.update_keys
        self.updates, self.update_keys = {}, {}
        written = self.store.update_payloads(updates)
        for image_id, sources in keys.items():
            if image_id in written:
                self.report.duplicates += len(sources)
                continue
            self.stored.discard(image_id)
            self.recorded.pop(image_id, None)
            self.with_blob.discard(image_id)
            for key in sources:
                self.report.failed.append(
                    FileFailure(key, "PointNotFound", "its stored image was deleted meanwhile; index it again")
                )

    def flush(self) -> None:
        """Embed and write the pending new images. One stored meanwhile by another process (same bytes, same id)
        is not upserted, which would replace its payload: this run's paths are added to it instead."""
        batch = self.batch
        if not batch.ids:
            return
        existing = {point.id: point.payload for point in self.store.get(list(batch.ids))}
        fresh = [at for at, image_id in enumerate(batch.ids) if image_id not in existing]
        if fresh:
            vectors = self.encoder.encode_images(torch.stack([batch.pixels[at] for at in fresh]))
            # merge_existing: one stored by another process since the look-up above gains these paths, keeps its own
            self.store.upsert(
                [batch.ids[at] for at in fresh], vectors, [batch.payloads[at] for at in fresh], merge_existing=True
            )
            self.report.added += len(fresh)
            for at in fresh:
                self.recorded[batch.ids[at]] = set(batch.payloads[at]["paths"])
                if batch.payloads[at].get("blob"):
                    self.with_blob.add(batch.ids[at])
        for at, image_id in enumerate(batch.ids):
            stored_payload = existing.get(image_id)
            if stored_payload is None:
                continue
            ours = batch.payloads[at]
            stored_paths = set(stored_payload.get("paths") or [])
            new_paths = tuple(p for p in ours["paths"] if p not in stored_paths)
            blob = ours.get("blob") if not stored_payload.get("blob") else None
            self.recorded[image_id] = stored_paths | set(ours["paths"])
            if blob or stored_payload.get("blob"):
                self.with_blob.add(image_id)
            first_path = batch.first_paths[at]
            first_recorded = (first_path in stored_paths) if first_path is not None else blob is None
            if new_paths or blob:
                update = PayloadUpdate(
                    add={"paths": new_paths} if new_paths else {},
                    set={"blob": blob, "source_name": ours["source_name"]} if blob else {},
                )
                self._queue(image_id, update, [] if first_recorded else [batch.keys[at]])
            if first_recorded:
                self.report.unchanged += 1
        self.stored.update(batch.ids)
        batch.clear()
        self.apply_updates()

    def _failed(self, key: str, error: BaseException) -> None:
        self.report.failed.append(FileFailure(key, type(error).__name__, _reason(error)))


def _merge_into(payload: PayloadDict, read: _Read, keep: Callable[[_Read], str]) -> bool:
    """Record read as one more source of a pending new image; False when it is recorded already."""
    if read.path is not None:
        if read.path in payload["paths"]:
            return False
        payload["paths"].append(read.path)
        return True
    if payload.get("blob"):
        return False
    payload["blob"] = keep(read)
    payload["source_name"] = read.key
    return True


def _key(source: ImageSource) -> str:
    if isinstance(source, ImageBytes):
        return source.name
    return path_text(source.path if isinstance(source, RefusedFile) else source)


def _reason(error: BaseException) -> str:
    return error.reason if isinstance(error, DecodeError) else str(error) or type(error).__name__


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _in_order(
    pool: ThreadPoolExecutor, work: Callable[[_T], _R], items: Iterable[_T], window: int
) -> Iterator[tuple[_T, _R | BaseException]]:
    """work over items in the pool, at most `window` in flight, yielding (item, result or error) in input order.

    Threads suffice: reading, PIL decoding and resizing and torch ops release the GIL, so decoding overlaps the
    model forward.
    """
    pending: deque[tuple[_T, Future[_R]]] = deque()

    def first() -> tuple[_T, _R | BaseException]:
        item, future = pending.popleft()
        try:
            return item, future.result()
        except Exception as error:  # one bad file fails alone; the run goes on
            return item, error

    for item in items:
        pending.append((item, pool.submit(work, item)))
        if len(pending) >= window:
            yield first()
    while pending:
        yield first()
