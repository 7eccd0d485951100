"""The indexing loop: reader/decoder threads -> encoder -> store writer. Runs in the CLI, a Celery task and tests."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from indexer.decode import DecodeLimits, decode_image, read_image_file
from indexer.encoder import ClipEncoder
from indexer.errors import DecodeError
from retriever.store import Payload, VectorStore

ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach, and the id fits a UUID (Qdrant point ids)


def content_id(data: bytes) -> str:
    """The id of an image: derived from its bytes, so re-indexing is idempotent and exact duplicates share it."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX_CHARS]


@dataclass
class FileFailure:
    path: str
    error: str  # exception type, e.g. "CorruptImage"
    reason: str


@dataclass
class IndexReport:
    files: int = 0
    added: int = 0  # new images embedded and stored
    duplicates: int = 0  # files whose bytes were already stored under another path: recorded as one more path
    unchanged: int = 0  # files already stored under this very path
    removed: int = 0  # images dropped because their only path now holds other bytes
    failed: list[FileFailure] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Prepared:
    path: str
    id: str
    payload: Payload | None = None  # None when the bytes were already stored: nothing decoded
    pixels: torch.Tensor | None = None


@dataclass
class _Batch:
    ids: list[str] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    payloads: list[Payload] = field(default_factory=list)

    def add(self, prepared: _Prepared) -> None:
        assert prepared.payload is not None and prepared.pixels is not None
        self.ids.append(prepared.id)
        self.pixels.append(prepared.pixels)
        self.payloads.append(prepared.payload)


def index_images(
    paths: Iterable[Path],
    encoder: ClipEncoder,
    store: VectorStore,
    batch_size: int = 32,
    workers: int = 2,
    limits: DecodeLimits | None = None,
    on_file: Callable[[], None] | None = None,
) -> IndexReport:
    """Index image files into store; per-file failures are collected in the report and the run goes on."""
    started = time.perf_counter()
    limits = limits or DecodeLimits()
    report = IndexReport()
    path_to_id, stored_ids = _stored_paths(store)
    preprocess, draft_size = encoder.preprocess, encoder.image_size

    def prepare(path: Path) -> _Prepared:
        data = read_image_file(path, limits)
        image_id = content_id(data)
        if image_id in stored_ids:
            return _Prepared(str(path), image_id)
        decoded = decode_image(data, source=path, limits=limits, draft_size=draft_size)
        payload: Payload = {
            "paths": [str(path)],
            "width": decoded.width,
            "height": decoded.height,
            "bytes": len(data),
            "format": decoded.format,
            "mtime": path.stat().st_mtime,
        }
        return _Prepared(str(path), image_id, payload, preprocess(decoded.image))

    batch = _Batch()

    def flush() -> None:
        if batch.ids:
            store.upsert(batch.ids, encoder.encode_images(torch.stack(batch.pixels)), batch.payloads)
            stored_ids.update(batch.ids)
            report.added += len(batch.ids)
            batch.ids.clear()
            batch.pixels.clear()
            batch.payloads.clear()

    for path, outcome in _in_parallel(prepare, paths, workers, window=2 * batch_size + workers):
        report.files += 1
        if isinstance(outcome, BaseException):
            report.failed.append(FileFailure(str(path), type(outcome).__name__, _reason(outcome)))
        else:
            previous_id = path_to_id.get(outcome.path)
            changed = previous_id is not None and previous_id != outcome.id  # new bytes at a known path
            if changed and detach_path(store, str(previous_id), outcome.path):
                report.removed += 1
                stored_ids.discard(str(previous_id))
            path_to_id[outcome.path] = outcome.id
            if outcome.id in batch.ids:
                batch.payloads[batch.ids.index(outcome.id)]["paths"].append(outcome.path)
                report.duplicates += 1
            elif outcome.id in stored_ids:
                if _attach_path(store, outcome.id, outcome.path):
                    report.duplicates += 1
                else:
                    report.unchanged += 1
            elif outcome.payload is None or outcome.pixels is None:
                # Stored when read, deleted since (its only path changed bytes earlier in this run): decode again.
                batch.add(prepare(Path(outcome.path)))
            else:
                batch.add(outcome)
            if len(batch.ids) >= batch_size:
                flush()
        if on_file is not None:
            on_file()
    flush()
    store.save()
    report.seconds = time.perf_counter() - started
    return report


def _stored_paths(store: VectorStore) -> tuple[dict[str, str], set[str]]:
    path_to_id: dict[str, str] = {}
    ids: set[str] = set()
    for record in store.scroll():
        ids.add(record.id)
        for path in record.payload.get("paths", []):
            path_to_id[str(path)] = record.id
    return path_to_id, ids


def _attach_path(store: VectorStore, image_id: str, path: str) -> bool:
    """Record path as one more file of a stored image; False when it was already recorded."""
    (record,) = store.get([image_id])
    paths = list(record.payload.get("paths", []))
    if path in paths:
        return False
    store.set_payload(image_id, {**record.payload, "paths": [*paths, path]})
    return True


def detach_path(store: VectorStore, image_id: str, path: str) -> bool:
    """Forget that path held this image; delete the image when no path is left (then True)."""
    records = store.get([image_id])
    if not records:
        return False
    paths = [p for p in records[0].payload.get("paths", []) if p != path]
    if paths:
        store.set_payload(image_id, {**records[0].payload, "paths": paths})
        return False
    return store.delete([image_id]) > 0


def _reason(error: BaseException) -> str:
    return error.reason if isinstance(error, DecodeError) else str(error) or type(error).__name__


def _in_parallel(
    work: Callable[[Path], _Prepared], paths: Iterable[Path], workers: int, window: int
) -> Iterator[tuple[Path, _Prepared | BaseException]]:
    """Run work over paths in a thread pool, at most `window` in flight, yielding results in input order.

    Threads suffice: PIL decoding and resizing and torch ops release the GIL, so decoding overlaps the model forward.
    """
    pending: list[tuple[Path, Future[_Prepared]]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        for path in paths:
            pending.append((path, pool.submit(work, path)))
            if len(pending) >= window:
                yield _result(*pending.pop(0))
        while pending:
            yield _result(*pending.pop(0))


def _result(path: Path, future: Future[_Prepared]) -> tuple[Path, _Prepared | BaseException]:
    try:
        return path, future.result()
    except Exception as error:  # one bad file fails alone; the run goes on
        return path, error
