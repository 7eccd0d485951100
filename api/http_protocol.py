"""The HTTP protocol `vlsearch serve` runs: uvicorn's httptools protocol with limits on the request head.

uvicorn with httptools reads a request head of any size (a megabyte of headers, ten thousand of them) for as long as
the client takes to send it, and answers what it cannot parse in plain text. Here the head is refused past
VLSEARCH_MAX_REQUEST_HEAD_BYTES (414 for the request line, 431 for the headers) or when it has not arrived
VLSEARCH_REQUEST_TIMEOUT seconds after its first byte (408; the body's own deadline is api.limits'), and every
refusal is the API's JSON error. Given to uvicorn by its import path, `http=PROTOCOL`, so that every worker process
loads it.
"""

from __future__ import annotations

import asyncio
import http
import json
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import STATUS_CODES, error_body
from core.container import build_settings

PROTOCOL = "api.http_protocol:LimitedHttpToolsProtocol"
HEAD_SETTING = "VLSEARCH_MAX_REQUEST_HEAD_BYTES"
TIMEOUT_SETTING = "VLSEARCH_REQUEST_TIMEOUT"


@cache
def _limits() -> tuple[int, float]:
    """(head bytes, head seconds) of this process's settings, read once."""
    settings = build_settings()
    return settings.max_request_head_bytes, settings.request_timeout


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools stops parsing, and uvicorn calls send_400_response."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bounded request head, a deadline for it, and JSON refusals (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes, self.head_timeout = _limits()
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None  # status and message of the answer to a head refused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that sends nothing is a head that never arrives

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 414, f"the request line is longer than {self.max_head_bytes} bytes ({HEAD_SETTING})")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 431, f"the headers pass {self.max_head_bytes} bytes ({HEAD_SETTING})")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head it could not parse (or that a callback refused), as the API's JSON error."""
        status, message = self._refusal or (400, "the request is not valid HTTP/1.1")
        self._send_error(status, message)

    def _count(self, size: int, status: int, message: str) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._refusal = (status, message)
            raise HeadTooLarge(message)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # an answer is under way (a pipelined head waits): close after it
            return
        self._send_error(408, f"the request head did not arrive within {self.head_timeout:g} s ({TIMEOUT_SETTING})")

    def _send_error(self, status: int, message: str) -> None:
        body = json.dumps(error_body(STATUS_CODES.get(status, f"http_{status}"), message)).encode()
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()
