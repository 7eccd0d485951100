"""POST /v1/ask: a question about one image (a stored id, or an upload) to the generative model.

One route, two bodies: JSON `{"image_id", "question", "collection", "history"}`, or multipart with `file` (or
`image_id`), `question`, `collection` and `history` (the list as one JSON-encoded field) fields. `history` holds the
earlier turns of a conversation about the image, `[{"question", "answer"}, ...]`, oldest first.

The body is read by the route (documented with openapi_extra), since a declared body parameter takes one content
type only.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, Json
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import MetricsDep, ReadAccess, ServiceDep, SettingsDep, visible
from api.json_body import JsonRoute, parse_json
from api.routes.search import ERRORS
from api.schemas import IMAGE_ID_PATTERN, MAX_TEXT, AnswerOut, AskRequest, FromText, History, Strict, validated
from core.service import InvalidQuery, Service

router = APIRouter(prefix="/v1", tags=["ask"], responses=ERRORS, route_class=JsonRoute)


class AskForm(Strict):
    model_config = FromText
    collection: str | None = None
    image_id: str | None = Field(None, pattern=IMAGE_ID_PATTERN)
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    history: Json[History] = Field(default_factory=list)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """model's JSON schema with its nested models written in place: openapi_extra adds no components."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)  # type: ignore[no-any-return]


_FORM_SCHEMA = {
    **_schema(AskForm),
    "properties": {**_schema(AskForm)["properties"], "file": {"type": "string", "format": "binary"}},
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _schema(AskRequest)},
            "multipart/form-data": {"schema": _FORM_SCHEMA},
        },
    }
}


def _answer(service: Service, collection: str, body: AskForm | AskRequest, data: bytes | None) -> AnswerOut:
    history = [(turn.question, turn.answer) for turn in body.history]
    if data is not None:
        answer = service.ask(data, body.question, collection, history)
        label = "<upload>"
    else:
        assert body.image_id is not None
        # The stored image itself: an id is never taken for a file on the server.
        answer = service.ask(service.load_image(body.image_id, collection), body.question, collection, history)
        label = body.image_id
    return AnswerOut(
        image=label,
        question=answer.question,
        answer=answer.answer,
        turns_used=answer.turns_used,
        turns_dropped=answer.turns_dropped,
        model=service.container.vlm().identity,
    )


@router.post("/ask", summary="Ask the generative model a question about one image", openapi_extra=OPENAPI_BODY)
async def ask(
    request: Request, principal: ReadAccess, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep
) -> AnswerOut:
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body: AskForm | AskRequest
    data: bytes | None = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async with request.form(max_files=1, max_fields=10) as form:
            upload = form.get("file")
            fields = {key: value for key, value in form.items() if key != "file" and isinstance(value, str)}
            body = validated(AskForm, fields)
            if isinstance(upload, UploadFile):
                data = await upload.read(settings.max_image_bytes + 1)
            elif upload is not None:
                raise InvalidQuery("file must be an uploaded file")
        if (data is None) == (body.image_id is None):
            raise InvalidQuery("give exactly one of file (an upload) or image_id (a stored image)")
    elif content_type == "application/json" or not content_type:
        body = validated(AskRequest, await _json(request))
    else:
        raise InvalidQuery(f"unsupported content type {content_type!r}: send JSON or multipart/form-data")
    collection = visible(principal, body.collection or settings.collection)
    result = await run_in_threadpool(_answer, service, collection, body, data)
    metrics.ask.observe(time.perf_counter() - started)
    return result


async def _json(request: Request) -> Any:
    return parse_json(await request.body())
