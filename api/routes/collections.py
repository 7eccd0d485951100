"""Collections: list, create, describe, drop, near-duplicates, and the tag export (streamed)."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import ReadAccess, ReadCollection, ServiceDep, SettingsDep, WriteAccess, WriteCollection, visible
from api.json_body import JsonRoute
from api.routes.search import ERRORS
from api.schemas import (
    CollectionCreate,
    CollectionList,
    CollectionOut,
    DropOut,
    DuplicateGroupOut,
    DuplicateMemberOut,
    DuplicatesOut,
)
from core.container import SHIPPED_CLIP_MODELS
from core.service import InvalidQuery, Service

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERRORS, route_class=JsonRoute)

EXPORT_CHUNK = 64 * 1024  # characters per streamed chunk, at most (about)
EXPORT_MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get("", summary="The collections this key may see")
def list_collections(principal: ReadAccess, service: ServiceDep, settings: SettingsDep) -> CollectionList:
    names = [name for name in service.list_collections() if principal.may_access(name)]
    return CollectionList(collections=names, default=settings.collection if settings.collection in names else None)


@router.post("", status_code=201, summary="Create an empty collection for an encoder")
def create_collection(
    body: CollectionCreate, principal: WriteAccess, service: ServiceDep, settings: SettingsDep
) -> CollectionOut:
    name = visible(principal, body.name)
    # Only encoders this server already trusts: a name or file given by a client would have it fetch and unpickle
    # weights from anywhere.
    served = [settings.clip_model, *(m for m in SHIPPED_CLIP_MODELS if m != settings.clip_model)]
    if body.model is not None and body.model not in served:
        raise InvalidQuery(f"model {body.model!r} is not served here: use one of {', '.join(served)}")
    if body.model is None or body.model == settings.clip_model:
        info = service.create_collection(name)
    else:
        info = service.create_collection(name, body.model)
    return CollectionOut(**info.to_dict())


@router.get("/{name}", summary="A collection's manifest and count")
def get_collection(name: ReadCollection, service: ServiceDep) -> CollectionOut:
    return CollectionOut(**service.info(name).to_dict())


@router.delete("/{name}", summary="Drop a whole collection")
def drop_collection(name: WriteCollection, service: ServiceDep) -> DropOut:
    return DropOut(**service.drop(name).to_dict())


@router.get("/{name}/duplicates", summary="Groups of near-duplicate images")
def duplicates(
    name: ReadCollection,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Annotated[float | None, Query(ge=-1, le=1, description="Similarity of near-duplicates.")] = None,
) -> DuplicatesOut:
    groups = service.duplicates(name, threshold)
    return DuplicatesOut(
        collection=name,
        threshold=threshold if threshold is not None else settings.dupes_threshold,
        groups=[
            DuplicateGroupOut(
                members=[DuplicateMemberOut(id=m.id, paths=m.paths, source_name=m.source_name) for m in group.members]
            )
            for group in groups
        ],
    )


class _QueueWriter(io.TextIOBase):
    """A text file whose writes go to a bounded queue, for the response to stream (the export blocks when the
    client reads slowly; a client gone stops it)."""

    def __init__(self, chunks: queue.Queue[str | BaseException | None], gone: threading.Event) -> None:
        self._chunks = chunks
        self._gone = gone

    def write(self, text: str) -> int:
        while not self._gone.is_set():
            try:
                self._chunks.put(text, timeout=0.5)
                return len(text)
            except queue.Full:
                continue
        raise BrokenPipeError("the client went away")


def _stream_export(service: Service, name: str, format: str) -> Iterator[str]:
    chunks: queue.Queue[str | BaseException | None] = queue.Queue(maxsize=256)
    gone = threading.Event()

    def export() -> None:
        try:
            service.export_tags(_QueueWriter(chunks, gone), format, name)
        except BaseException as error:  # handed to the response, which ends the stream
            chunks.put(error)
            return
        chunks.put(None)

    threading.Thread(target=export, name=f"export-{name}", daemon=True).start()
    try:
        while True:
            parts: list[str] = []
            item = chunks.get()
            while isinstance(item, str):  # what is ready goes out together: few large chunks, not one per row
                parts.append(item)
                if sum(map(len, parts)) >= EXPORT_CHUNK:
                    break
                try:
                    item = chunks.get_nowait()
                except queue.Empty:
                    break
            if parts:
                yield "".join(parts)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
    finally:
        gone.set()


@router.get(
    "/{name}/tags/export",
    summary="Every image's id, paths and tags with scores, as JSONL or CSV (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
)
def export_tags(
    name: ReadCollection,
    service: ServiceDep,
    format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl or csv.")] = "jsonl",
) -> StreamingResponse:
    service.store(name)  # a missing collection is a 404 before the stream starts
    return StreamingResponse(
        _stream_export(service, name, format),
        media_type=EXPORT_MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{name}-tags.{format}"'},
    )
