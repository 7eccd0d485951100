"""POST /v1/ask: a stored image or an upload, as JSON or multipart; refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.api.conftest import Keys, Server, Template, error_of, scene_bytes


@pytest.fixture(scope="module")
def reader(server: Server, keys: Keys) -> Iterator:
    with server.client(keys.read) as client:
        yield client


def test_a_question_about_a_stored_image(reader, image_ids: list[str]) -> None:
    response = reader.post("/v1/ask", json={"image_id": image_ids[0], "question": "What shapes are there?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == image_ids[0] and body["question"] == "What shapes are there?"
    assert isinstance(body["answer"], str) and body["answer"] and body["model"].startswith("sha256:")
    as_form = reader.post("/v1/ask", data={"image_id": image_ids[0], "question": "What shapes are there?"})
    assert as_form.status_code == 200 and as_form.json()["answer"] == body["answer"]  # greedy: the same answer


def test_a_question_about_an_upload(reader, template: Template) -> None:
    files = {"file": ("q.png", scene_bytes(template), "image/png")}
    response = reader.post("/v1/ask", files=files, data={"question": "Is there a circle?"})
    assert response.status_code == 200, response.text
    assert response.json()["image"] == "<upload>" and response.json()["answer"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"question": "why?"}}, 422, "invalid_request"),  # no image
        ({"json": {"image_id": "ab" * 32}}, 422, "invalid_request"),  # no question
        ({"json": {"image_id": "ab" * 32, "question": "why?"}}, 404, "point_not_found"),
        ({"json": {"image_id": "../../etc/passwd", "question": "why?"}}, 422, "invalid_request"),
        ({"json": {"image_id": "ab" * 32, "question": "why?", "collection": "absent"}}, 404, "collection_not_found"),
        ({"content": b"{oops", "headers": {"Content-Type": "application/json"}}, 422, "invalid_request"),
        ({"content": b"question", "headers": {"Content-Type": "text/csv"}}, 400, "invalid_query"),
        ({"data": {"question": "why?"}}, 400, "invalid_query"),  # multipart without file or image_id
        ({"files": {"file": ("q.txt", b"not an image", "text/plain")}, "data": {"question": "why?"}}, 400, None),
        ("both", 400, "invalid_query"),
    ],
)
def test_bad_questions_are_json_errors(reader, template: Template, image_ids, kwargs, status: int, code) -> None:
    if kwargs == "both":
        files = {"file": ("q.png", scene_bytes(template), "image/png")}
        kwargs = {"files": files, "data": {"question": "why?", "image_id": image_ids[0]}}
    response = reader.post("/v1/ask", **kwargs)
    assert response.status_code == status, response.text
    assert code is None or error_of(response)["code"] == code


HISTORY = [
    {"question": "how many shapes are there?", "answer": "two"},
    {"question": "is there a red circle?", "answer": "no"},
]


def test_a_question_after_earlier_turns_as_json_and_as_a_form(reader, image_ids: list[str]) -> None:
    question = {"image_id": image_ids[1], "question": "what colour is the circle?"}
    alone = reader.post("/v1/ask", json=question)
    assert alone.status_code == 200, alone.text
    assert (alone.json()["turns_used"], alone.json()["turns_dropped"]) == (0, 0)
    response = reader.post("/v1/ask", json={**question, "history": HISTORY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["turns_used"], body["turns_dropped"]) == (2, 0) and isinstance(body["answer"], str)
    as_form = reader.post("/v1/ask", data={**question, "history": json.dumps(HISTORY)})
    assert as_form.status_code == 200, as_form.text
    assert as_form.json() == body  # greedy: the same answer to the same conversation


def test_an_upload_with_a_long_history_drops_its_oldest_turns(reader, template: Template) -> None:
    history = [{"question": f"is there a red circle number {i}?", "answer": "no"} for i in range(50)]
    files = {"file": ("q.png", scene_bytes(template), "image/png")}
    response = reader.post("/v1/ask", files=files, data={"question": "what?", "history": json.dumps(history)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["turns_dropped"] > 0 and body["turns_used"] + body["turns_dropped"] == 50


@pytest.mark.parametrize(
    "history",
    [
        {"question": "a", "answer": "b"},  # not a list
        [{"question": "a"}],  # no answer
        [{"question": "", "answer": "b"}],  # an empty question
        [{"question": "a", "answer": "b", "extra": 1}],
        [{"question": "a" * 2001, "answer": "b"}],
        [{"question": "a", "answer": "b"}] * 51,  # more turns than allowed
        [["a", "b"]],
    ],
)
def test_bad_histories_are_422_json_errors(reader, image_ids: list[str], history) -> None:
    question = {"image_id": image_ids[0], "question": "why?"}
    for response in (
        reader.post("/v1/ask", json={**question, "history": history}),
        reader.post("/v1/ask", data={**question, "history": json.dumps(history)}),
    ):
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] == "invalid_request"


def test_a_history_form_field_that_is_not_json_is_a_422(reader, image_ids: list[str]) -> None:
    response = reader.post("/v1/ask", data={"image_id": image_ids[0], "question": "why?", "history": "[oops"})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


def test_the_image_placeholder_in_a_history_is_refused(reader, image_ids: list[str]) -> None:
    history = [{"question": "what is <image_placeholder>?", "answer": "red"}]
    response = reader.post("/v1/ask", json={"image_id": image_ids[0], "question": "why?", "history": history})
    assert response.status_code == 400 and "image placeholder" in error_of(response)["message"]
