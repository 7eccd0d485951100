"""One stored image: its record, a thumbnail, similar images, and deleting it."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response

from api.deps import MetricsDep, ReadCollection, ServiceDep, SettingsDep, WriteCollection
from api.json_body import JsonRoute
from api.routes.search import ERRORS, run_search
from api.schemas import IMAGE_ID_PATTERN, DeleteOut, ImageOut, SearchResponse, SimilarParams
from core.media import MAX_THUMBNAIL_SIDE, MIN_THUMBNAIL_SIDE
from core.service import PointNotFound

router = APIRouter(prefix="/v1/collections/{name}/images", tags=["images"], responses=ERRORS, route_class=JsonRoute)

ImageIdPath = Annotated[str, Path(pattern=IMAGE_ID_PATTERN, description="The image's id (hex of its content hash).")]


@router.get("/{image_id}", summary="A stored image's paths and payload")
def get_image(name: ReadCollection, image_id: ImageIdPath, service: ServiceDep) -> ImageOut:
    payload = service.payload(image_id, name)
    return ImageOut(
        id=image_id,
        collection=name,
        paths=[str(path) for path in payload.get("paths", [])],
        payload={key: value for key, value in payload.items() if key != "blob"},
        thumbnail_url=f"/v1/collections/{quote(name, safe='')}/images/{image_id}/thumbnail",
    )


@router.get(
    "/{image_id}/thumbnail",
    summary="A small JPEG of the image (made once, then cached on disk)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "The thumbnail."}},
)
def thumbnail(
    name: ReadCollection,
    image_id: ImageIdPath,
    service: ServiceDep,
    size: Annotated[
        int, Query(ge=MIN_THUMBNAIL_SIDE, le=MAX_THUMBNAIL_SIDE, description="Longest side in pixels.")
    ] = 256,
) -> Response:
    picture = service.thumbnail(image_id, size, name)
    # An id is a content hash: the bytes behind it never change (private: the route needs a key).
    headers = {"Cache-Control": "private, max-age=86400", "ETag": f'"{image_id}-{size}"'}
    return Response(picture.data, media_type=picture.media_type, headers=headers)


@router.get(
    "/{image_id}/similar", response_model=SearchResponse, summary="Images that look like this one (never itself)"
)
def similar(
    name: ReadCollection,
    image_id: ImageIdPath,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    params: Annotated[SimilarParams, Query()],
) -> Response:
    started = time.perf_counter()
    options = params.options(name)
    return run_search(service, settings, metrics, options, name, started, image_id=image_id)


@router.delete("/{image_id}", summary="Remove an image from the collection")
def delete_image(name: WriteCollection, image_id: ImageIdPath, service: ServiceDep) -> DeleteOut:
    service.payload(image_id, name)  # PointNotFound (404) for an id the collection does not hold
    result = service.delete([image_id], name)
    if not result.deleted:
        raise PointNotFound(f"no image with id {image_id!r} in collection {name!r}")
    return DeleteOut(**result.to_dict())
