"""Hostile requests against a real `vlsearch serve`: each is answered with a 4xx JSON error (never a 500, a plain-text
refusal or a connection held open), and the server keeps answering after it.

JSON nested 10,000 deep, a 1 MB query text, numbers out of range or not finite, unknown fields, wrong types, multipart
bodies of 1,000 parts, bodies over the limit sent slowly, request heads over their size or never finished, collection
names with `../`, ids that are not hex. tests/api checks the ordinary refusals (k over VLSEARCH_API_MAX_K, a text
over 2,000 characters, a bad date); this module the hostile ones, some through raw sockets, since a client library
will not send them.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from core.keys import KeyStore
from core.service import Service
from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import Client, Server, error_of, model_settings, start_server, stop_server

REDIS_URL = "redis://127.0.0.1:6379/15"
UPLOAD_LIMIT = 2 * 1024 * 1024  # over a 1 MB text, so that the text reaches validation
REQUEST_TIMEOUT = 4.0  # VLSEARCH_REQUEST_TIMEOUT of this server: slow clients are cut off quickly
LATE = 3.0  # how late a refusal may come on two busy cores
HEAD_LIMIT = 64 * 1024  # VLSEARCH_MAX_REQUEST_HEAD_BYTES, the default
MISSING = "ab" * 16  # hex, but no image of the collection


@dataclass(frozen=True)
class Target:
    server: Server
    read: str
    write: str
    image_id: str

    @property
    def port(self) -> int:
        return int(self.server.base_url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A server over collection `shapes` (4 scenes), with a read and a write key, jobs on Redis database 15."""
    root = tmp_path_factory.mktemp("hostile")
    write_collection(generate_scenes("test", 4, seed=5), root / "scenes", size=64)
    data_dir = root / "data"
    with Service(model_settings(data_dir)) as service:
        service.index([root / "scenes"], "shapes")
        image_id = service.point_ids("shapes")[0]
    keys = KeyStore.from_settings(model_settings(data_dir))
    read, write = keys.create("read", name="reader").secret, keys.create("read,write", name="writer").secret
    jobs = redis.Redis.from_url(REDIS_URL)
    before = set(jobs.scan_iter("vlsearch:job:*"))
    server = start_server(
        data_dir,
        root / "server.log",
        redis_url=REDIS_URL,
        max_upload_bytes=str(UPLOAD_LIMIT),
        request_timeout=str(REQUEST_TIMEOUT),
    )
    yield Target(server, read, write, image_id)
    stop_server(server)
    for key in set(jobs.scan_iter("vlsearch:job:*")) - before:  # jobs this module submitted, none expected
        jobs.delete(key)
    jobs.close()


@pytest.fixture(scope="module")
def writer(target: Target) -> Iterator[Client]:
    with target.server.client(target.write) as client:
        yield client


def refused(response: httpx.Response, status: int, code: str | None = None) -> str:
    """The message of a JSON error answer with this status (and code)."""
    assert response.status_code == status, response.text[:500]
    error = error_of(response)
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


# --- JSON nested 10,000 deep ------------------------------------------------------------------------------------

DEEP_ARRAY = "[" * 10_000 + "]" * 10_000
DEEP_OBJECT = '{"a":' * 10_000 + "1" + "}" * 10_000
JSON_ROUTES = ["/v1/search", "/v1/search/url", "/v1/collections", "/v1/jobs", "/v1/ask", "/knn-service", "/metadata"]


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT, '{"text": "x", "filter": ' + DEEP_OBJECT + "}"])
def test_json_nested_10000_deep_is_a_422_on_every_json_route(writer: Client, path: str, body: str) -> None:
    response = writer.post(path, content=body, headers={"Content-Type": "application/json"})
    assert "recursion limit exceeded" in refused(response, 422, "invalid_request")


def test_json_nested_10000_deep_in_a_form_field_is_a_422(writer: Client, target: Target) -> None:
    upload = {"file": ("q.png", b"\x89PNG", "image/png")}
    for path, fields in (
        ("/v1/search/image", {"options": DEEP_ARRAY}),
        ("/v1/ask", {"question": "q", "history": DEEP_ARRAY}),
    ):
        assert "recursion limit" in refused(writer.post(path, files=upload, data=fields), 422, "invalid_request")


# --- a 1 MB query text --------------------------------------------------------------------------------------------

MEGABYTE_TEXT = "a red circle " * 85_000  # 1.1 MB: more than a form field may hold (1 MiB)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/search", {"text": MEGABYTE_TEXT}),
        ("/v1/search", {"text": "x", "negative": MEGABYTE_TEXT}),
        ("/v1/search/url", {"url": "http://example.test/" + MEGABYTE_TEXT}),
        ("/v1/ask", {"image_id": MISSING, "question": MEGABYTE_TEXT}),
        ("/knn-service", {"text": MEGABYTE_TEXT}),
    ],
)
def test_a_1_mb_query_text_is_a_422(writer: Client, path: str, body: dict[str, Any]) -> None:
    assert "at most" in refused(writer.post(path, json=body), 422, "invalid_request")


def test_a_1_mb_text_in_a_form_or_a_query_string_is_refused(writer: Client, target: Target) -> None:
    upload = {"file": ("q.png", b"\x89PNG", "image/png")}
    part = writer.post("/v1/search/image", files=upload, data={"text": MEGABYTE_TEXT})
    assert "Part exceeded maximum size" in refused(part, 400, "bad_request")  # a form field holds 1 MB at most
    # a request line of a megabyte: refused by the server's protocol before the app, still JSON
    status, headers, body = raw_exchange(target.port, request_head(f"/v1/collections?text={'a' * 1_000_000}"))
    assert status == 414 and headers["content-type"] == "application/json", (status, body)
    assert json.loads(body)["error"]["code"] == "uri_too_long"


# --- k, offset, weights out of range or not finite -------------------------------------------------------------

SEARCH_NUMBERS = [
    '{"text": "x", "k": NaN}',
    '{"text": "x", "k": Infinity}',
    '{"text": "x", "k": 1e400}',
    '{"text": "x", "k": 2.5}',
    '{"text": "x", "k": -1}',
    '{"text": "x", "offset": -Infinity}',
    '{"text": "x", "offset": 1e300}',
    '{"text": "x", "text_weight": NaN}',
    '{"text": "x", "text_weight": 1e308}',
    '{"text": "x", "image_weight": -11}',
    '{"text": "x", "negative": "y", "negative_weight": Infinity}',
    '{"text": "x", "min_score": NaN}',  # min_score has no bound: NaN once passed, answered with no hit
    '{"text": "x", "min_score": -Infinity}',
    '{"text": "x", "rerank": true, "fusion_weight": NaN}',
    '{"text": "x", "min_relevance": Infinity}',
    '{"text": "x", "rerank_k": 0}',
]


@pytest.mark.parametrize("body", SEARCH_NUMBERS)
def test_search_numbers_out_of_range_or_not_finite_are_422(writer: Client, body: str) -> None:
    response = writer.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
    refused(response, 422, "invalid_request")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": "x", "k": 10**40}, 400),  # an integer past VLSEARCH_API_MAX_K, however large
        ({"text": "x", "offset": 10**40}, 400),
        ({"text": "x", "rerank": True, "rerank_k": 10**40}, 400),
    ],
)
def test_huge_integers_are_refused_by_the_settings_bounds(writer: Client, body: dict[str, Any], status: int) -> None:
    assert "VLSEARCH_API_MAX" in refused(writer.post("/v1/search", json=body), status, "invalid_query")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("similar", {"k": "nan"}),
        ("similar", {"min_score": "nan"}),
        ("similar", {"min_score": "-inf"}),
        ("similar", {"offset": "-1"}),
        ("similar", {"k": "1e3"}),
        ("thumbnail", {"size": "nan"}),
        ("thumbnail", {"size": "100000"}),
        ("duplicates", {"threshold": "nan"}),
        ("duplicates", {"threshold": "inf"}),
        ("jobs", {"limit": "1e9"}),
    ],
)
def test_query_string_numbers_out_of_range_or_not_finite_are_422(
    writer: Client, target: Target, path: str, params: dict[str, str]
) -> None:
    url = {
        "similar": f"/v1/collections/shapes/images/{target.image_id}/similar",
        "thumbnail": f"/v1/collections/shapes/images/{target.image_id}/thumbnail",
        "duplicates": "/v1/collections/shapes/duplicates",
        "jobs": "/v1/jobs",
    }[path]
    refused(writer.get(url, params=params), 422, "invalid_request")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", '{"kind": "tag", "threshold": NaN}'),
        ("/v1/jobs", '{"kind": "tag", "threshold": 1.5}'),
        ("/knn-service", '{"embedding_input": [NaN, 1.0]}'),  # once a NaN vector searched
        ("/knn-service", '{"embedding_input": [1e400]}'),
        ("/knn-service", '{"embedding_input": []}'),
        ("/knn-service", '{"text": "x", "num_images": 0}'),
        ("/knn-service", '{"text": "x", "aesthetic_score": NaN}'),
    ],
)
def test_other_numbers_out_of_range_or_not_finite_are_422(writer: Client, path: str, body: str) -> None:
    refused(writer.post(path, content=body, headers={"Content-Type": "application/json"}), 422, "invalid_request")


# --- unknown fields and wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/collections", {"name": "fresh", "bogus": 1}),
        ("/v1/jobs", {"kind": "caption", "bogus": 1}),
        ("/v1/jobs", {"kind": "index", "paths": ["/tmp"], "labels": ["a"]}),  # another kind's field
        ("/v1/search/url", {"url": "http://example.test/a.png", "bogus": 1}),
        ("/v1/ask", {"image_id": MISSING, "question": "q", "bogus": 1}),
        ("/v1/ask", {"image_id": MISSING, "question": "q", "history": [{"question": "a", "answer": "b", "x": 1}]}),
    ],
)
def test_unknown_fields_are_422(writer: Client, path: str, body: dict[str, Any]) -> None:
    assert "Extra inputs are not permitted" in refused(writer.post(path, json=body), 422, "invalid_request")


def test_unknown_query_parameters_and_form_fields_are_422(writer: Client, target: Target) -> None:
    similar = writer.get(f"/v1/collections/shapes/images/{target.image_id}/similar", params={"tag_any": "a"})
    assert "tag_any" in refused(similar, 422, "invalid_request")
    ask = writer.post("/v1/ask", data={"question": "q", "image_id": target.image_id, "bogus": "1"})
    assert "bogus" in refused(ask, 422, "invalid_request")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/search", []),
        ("/v1/search", "a red circle"),
        ("/v1/search", None),
        ("/v1/search", 5),
        ("/v1/search", {"text": 5}),
        ("/v1/search", {"text": ["a"]}),
        ("/v1/search", {"text": "x", "k": "10"}),  # JSON bodies take each value in its own JSON type
        ("/v1/search", {"text": "x", "k": True}),
        ("/v1/search", {"text": "x", "rerank": "yes"}),
        ("/v1/search", {"text": "x", "rerank": 1}),
        ("/v1/search", {"text": "x", "filter": []}),
        ("/v1/search", {"text": "x", "filter": {"tags_any": "a"}}),
        ("/v1/search", {"text": "x", "filter": {"min_width": "64"}}),
        ("/v1/collections", {"name": 7}),
        ("/v1/jobs", {"kind": "caption", "force": 0}),
        ("/v1/jobs", {"kind": "tag", "labels": "circle"}),
        ("/v1/jobs", {"kind": "index", "paths": "/tmp"}),
        ("/v1/jobs", {"kind": 1}),
        ("/v1/ask", {"image_id": MISSING, "question": "q", "history": {"question": "a"}}),
        ("/knn-service", {"text": ["a"]}),
        ("/knn-service", {"image": 12}),
        ("/metadata", {"ids": "abababab"}),
    ],
)
def test_wrong_types_are_422(writer: Client, path: str, body: Any) -> None:
    refused(writer.post(path, json=body), 422, "invalid_request")


def test_a_body_of_another_content_type_is_refused(writer: Client) -> None:
    as_text = writer.post("/v1/search", content=b'{"text": "x"}', headers={"Content-Type": "text/plain"})
    refused(as_text, 422, "invalid_request")
    as_form = writer.post("/v1/search", data={"text": "x"})
    refused(as_form, 422, "invalid_request")
    ask = writer.post("/v1/ask", content=b"question=q", headers={"Content-Type": "application/xml"})
    refused(ask, 400, "invalid_query")


def test_text_that_is_not_unicode_is_a_422(writer: Client) -> None:
    # An unpaired surrogate escape is JSON, but no text: it once reached SQLite and ended in a 500.
    for body in ('{"text": "x", "filter": {"path_prefix": "\\udfff"}}', '{"text": "\\ud800"}'):
        response = writer.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
        refused(response, 422, "invalid_request")
    invalid_utf8 = writer.post(
        "/v1/search", content=b'{"text": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    refused(invalid_utf8, 422, "invalid_request")


# --- multipart with 1,000 parts ---------------------------------------------------------------------------------


def test_a_multipart_of_1000_parts_is_refused(writer: Client) -> None:
    upload = ("file", ("q.png", b"\x89PNG", "image/png"))
    fields = [(f"f{number}", (None, "1")) for number in range(1001)]
    many = writer.post("/v1/search/image", files=[*fields, upload])
    assert "Too many fields" in refused(many, 400, "bad_request")
    files = [("file", (f"q{number}.png", b"\x89PNG", "image/png")) for number in range(1001)]
    assert "Too many files" in refused(writer.post("/v1/search/image", files=files), 400, "bad_request")
    # under the framework's limit, each unknown part is named (five of them, and how many more)
    under = writer.post("/v1/search/image", files=[*fields[:999], upload])
    assert "(and 994 more)" in refused(under, 422, "invalid_request")
    ask = writer.post("/v1/ask", files=fields[:11])  # /v1/ask takes 10 fields
    assert "Too many fields" in refused(ask, 400, "bad_request")


# --- raw HTTP: bodies sent slowly, request heads over size ------------------------------------------------------


def request_head(path: str, method: str = "GET", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {name.lower(): value for name, value in headers.items()}, body


def read_response(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (or seconds pass: then the test fails)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # it closed with our unread bytes pending: what it sent came first
        pass
    return data


def raw_exchange(port: int, data: bytes, seconds: float = 10) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before all of it went out
            sock.sendall(data)
        return parse_response(read_response(sock, seconds))


def json_error(status: int, headers: dict[str, str], body: bytes) -> dict[str, str]:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    assert headers.get("connection") == "close", headers
    error: dict[str, str] = json.loads(body)["error"]
    assert set(error) == {"code", "message"}
    return error


FILE_PART = b'--x\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\nContent-Type: image/png\r\n\r\n'


def trickle(target: Target, path: str, chunk: int, pause: float) -> tuple[float, bytes]:
    """A chunked body sent `chunk` bytes at a time every `pause` seconds until the server answers or stops reading:
    the seconds that took, and the answer. To /v1/search/image, the body is a file part of a multipart form."""
    form = path == "/v1/search/image"
    content_type = "multipart/form-data; boundary=x" if form else "application/json"
    auth = f"Authorization: Bearer {target.read}"
    head = request_head(path, "POST", auth, f"Content-Type: {content_type}", "Transfer-Encoding: chunked")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", target.port), timeout=2) as sock:
        sock.sendall(head + (b"%x\r\n%s\r\n" % (len(FILE_PART), FILE_PART) if form else b""))
        while time.monotonic() - started < 30 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (chunk, b"a" * chunk))
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # it has stopped reading: its answer is on the way
            time.sleep(pause)
        seconds = time.monotonic() - started
        return seconds, read_response(sock, 5)


@pytest.mark.parametrize("path", ["/v1/search", "/knn-service", "/v1/ask", "/v1/search/image"])
def test_a_body_over_the_limit_sent_in_pieces_is_413_once_past_it(target: Target, path: str) -> None:
    seconds, answer = trickle(target, path, chunk=256 * 1024, pause=0.05)
    error = json_error(*parse_response(answer))
    assert parse_response(answer)[0] == 413 and error["code"] == "too_large"
    assert seconds < REQUEST_TIMEOUT, seconds  # at the limit, not at the end of the body or the deadline


def test_a_body_sent_slowly_is_408_at_the_deadline(target: Target) -> None:
    seconds, answer = trickle(target, "/v1/search", chunk=1024, pause=0.25)
    status, headers, body = parse_response(answer)
    assert status == 408 and json_error(status, headers, body)["code"] == "request_timeout"
    assert REQUEST_TIMEOUT <= seconds < REQUEST_TIMEOUT + LATE, seconds


def test_a_declared_length_over_the_limit_is_413_before_the_body(target: Target) -> None:
    head = request_head("/v1/search", "POST", f"Authorization: Bearer {target.read}", "Content-Length: 99999999999")
    status, headers, body = raw_exchange(target.port, head)
    assert status == 413 and json_error(status, headers, body)["code"] == "too_large"


def test_a_body_that_never_ends_is_408(target: Target) -> None:
    head = request_head("/v1/search", "POST", f"Authorization: Bearer {target.read}", "Content-Length: 1000")
    started = time.monotonic()
    status, headers, body = raw_exchange(target.port, head + b'{"text": ', seconds=REQUEST_TIMEOUT + 5)
    assert status == 408 and json_error(status, headers, body)["code"] == "request_timeout"
    assert time.monotonic() - started < REQUEST_TIMEOUT + LATE


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (request_head("/healthz", "GET", "X-Big: " + "a" * 100_000), 431, "headers_too_large"),
        (request_head("/healthz", "GET", "X-Big: " + "a" * 1_000_000), 431, "headers_too_large"),
        (request_head("/healthz", "GET", *(f"X-{n}: a" for n in range(10_000))), 431, "headers_too_large"),
        (request_head("/v1/collections?x=" + "a" * 100_000), 414, "uri_too_long"),
        (request_head("/healthz", "GET", "Content-Length: -5"), 400, "bad_request"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64), 400, "bad_request"),  # TLS to a plain port
    ],
    ids=["header-100KB", "header-1MB", "10000-headers", "url-100KB", "negative-length", "not-http"],
)
def test_heads_over_size_or_not_http_are_refused_in_json(target: Target, head: bytes, status: int, code: str) -> None:
    answer = raw_exchange(target.port, head)
    assert answer[0] == status and json_error(*answer)["code"] == code, answer
    if status != 400:
        assert f"{HEAD_LIMIT} bytes (VLSEARCH_MAX_REQUEST_HEAD_BYTES)" in json_error(*answer)["message"]


def test_a_head_that_never_ends_is_408_and_the_connection_closed(target: Target) -> None:
    for partial in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # nothing at all, or no end of the head
        started = time.monotonic()
        answer = raw_exchange(target.port, partial, seconds=REQUEST_TIMEOUT + 5)
        assert answer[0] == 408 and json_error(*answer)["code"] == "request_timeout", answer
        assert REQUEST_TIMEOUT <= time.monotonic() - started < REQUEST_TIMEOUT + LATE


# --- names and ids ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/collections/..%2F..%2Fetc", 404, "not_found"),  # decoded, it is no route
        ("GET", "/v1/collections/%2E%2E", 400, "invalid_query"),
        ("GET", "/v1/collections/%2E%2E/tags/export", 400, "invalid_query"),
        ("DELETE", "/v1/collections/%2E%2E", 400, "invalid_query"),
        ("GET", "/v1/collections/.hidden", 400, "invalid_query"),
        ("GET", "/v1/collections/" + "a" * 201, 422, "invalid_request"),
        ("GET", "/v1/collections/%2E%2E/images/abababab/thumbnail", 400, "invalid_query"),
    ],
)
def test_collection_names_with_dots_and_slashes_in_the_path_are_refused(
    writer: Client, method: str, path: str, status: int, code: str
) -> None:
    refused(writer.request(method, path), status, code)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/search", {"text": "x", "collection": "../shapes"}),
        ("/v1/search", {"text": "x", "collection": "../../../etc/passwd"}),
        ("/v1/search", {"text": "x", "collection": "shapes/../shapes"}),
        ("/v1/jobs", {"kind": "caption", "collection": "../shapes"}),
        ("/v1/ask", {"image_id": MISSING, "question": "q", "collection": "../shapes"}),
        ("/knn-service", {"text": "x", "indice_name": "../shapes"}),
        ("/metadata", {"ids": [MISSING], "indice_name": "../shapes"}),
    ],
)
def test_collection_names_with_dots_and_slashes_in_a_body_are_400(writer: Client, path: str, body: dict) -> None:
    assert "invalid collection name" in refused(writer.post(path, json=body), 400, "invalid_query")


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", ".hidden", "-x", "a" * 101])
def test_a_new_collection_needs_a_plain_name(writer: Client, target: Target, name: str) -> None:
    assert "pattern" in refused(writer.post("/v1/collections", json={"name": name}), 422, "invalid_request")
    assert not (target.server.data_dir.parent / "evil").exists()


@pytest.mark.parametrize(
    "image_id", ["ZZZZZZZZ", "ABCDEF12", "abc", "a" * 65, "0x1234abcd", "abcdef12%00", "-1", "%2E%2E"]
)
def test_image_ids_that_are_not_hex_are_422(writer: Client, image_id: str) -> None:
    for suffix in ("", "/thumbnail", "/similar"):
        refused(writer.get(f"/v1/collections/shapes/images/{image_id}{suffix}"), 422, "invalid_request")
    refused(writer.delete(f"/v1/collections/shapes/images/{image_id}"), 422, "invalid_request")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/search", {"image_id": "not-hex!"}),
        ("/v1/ask", {"image_id": "../../etc/passwd", "question": "q"}),
        ("/metadata", {"ids": ["ABABABAB", "zz"]}),
    ],
)
def test_ids_that_are_not_hex_in_a_body_are_422(writer: Client, path: str, body: dict[str, Any]) -> None:
    refused(writer.post(path, json=body), 422, "invalid_request")


@pytest.mark.parametrize("job_id", ["not-a-job", "a" * 5000, "%00%ff", "A" * 32])
def test_job_ids_that_are_not_32_hex_digits_are_422(writer: Client, job_id: str) -> None:
    refused(writer.get(f"/v1/jobs/{job_id}"), 422, "invalid_request")
    refused(writer.delete(f"/v1/jobs/{job_id}"), 422, "invalid_request")


# --- server paths a write key names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"kind": "index", "paths": ["x" * 300]}, 400, "no such file"),  # ENAMETOOLONG: once a 500
        ({"kind": "index", "paths": [""]}, 422, "at least 1 character"),  # "" is the server's working directory
        ({"kind": "tag", "labels_file": "/dev/zero"}, 400, "not a regular file"),  # once read for ever
        ({"kind": "tag", "labels_file": "/"}, 400, "not a regular file"),
        ({"kind": "tag", "labels_file": "x" * 300}, 400, "cannot be read"),
    ],
)
def test_server_paths_that_cannot_be_read_are_refused(
    writer: Client, body: dict[str, Any], status: int, words: str
) -> None:
    assert words in refused(writer.post("/v1/jobs", json=body), status)


def test_a_405_lists_every_method_of_the_path(writer: Client) -> None:
    # Starlette named the methods of the first route that matched the path only
    for method, path, allowed in [
        ("OPTIONS", "/v1/collections", "GET, POST"),
        ("PUT", "/v1/collections/shapes", "DELETE, GET"),
        ("PATCH", f"/v1/jobs/{'a' * 32}", "DELETE, GET"),
        ("POST", "/healthz", "GET"),
    ]:
        response = writer.request(method, path)
        refused(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed, (method, path)


def test_the_server_answered_everything_without_an_unexpected_error(target: Target, writer: Client) -> None:
    assert writer.get("/healthz").status_code == 200
    assert writer.post("/v1/search", json={"text": "a red circle", "k": 2}).status_code == 200
    log = target.server.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
