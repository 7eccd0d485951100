"""Request limits: the body-size cap (413 before a body is read whole), the time a body may take to arrive (408),
and requests per key per window (429)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any

import redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response

log = logging.getLogger("vlsearch.api")

UPLOAD_SETTING = "VLSEARCH_MAX_UPLOAD_BYTES"
TIMEOUT_SETTING = "VLSEARCH_REQUEST_TIMEOUT"
CLOSE = {"Connection": "close"}  # the rest of a refused body is not read: the server drops the connection


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes ({UPLOAD_SETTING})"


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", _too_large(limit), CLOSE)


class BodyTimeout(ApiError):
    def __init__(self, timeout: float) -> None:
        message = f"the request body did not arrive within {timeout:g} s ({TIMEOUT_SETTING})"
        super().__init__(408, "request_timeout", message, CLOSE)


class BodyLimitMiddleware:
    """Refuses a body over `limit` bytes: at once when its Content-Length says so (the app is not called), else
    as soon as the bytes received pass it (the read raises BodyTooLarge, which the error handlers answer). A body
    still arriving `timeout` seconds after its request's head is refused too (BodyTimeout, a 408). An answer sent
    before its request's body was read whole (a refusal, mostly) closes the connection: else the server would go on
    reading, and dropping, whatever the client still sends."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            response = error_response(413, "too_large", _too_large(self.limit), CLOSE)
            await response(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        complete = not (declared or _chunked(scope))

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # past the body, a receive waits for the client to go (a streamed answer): no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # no task a receive, unlike wait_for: this is every body
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                complete = not message.get("more_body", False)
            return message

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited, closing)


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RateLimiter:
    """A fixed window per key: at most `limit` requests in each window of `window` seconds (window number =
    epoch seconds // window). Counted in Redis (INCR + EXPIRE, shared by every API process) when a URL is given
    and Redis answers, else in this process; an unreachable Redis is tried again after `retry_after` seconds."""

    def __init__(self, limit: int, window: int, redis_url: str | None = None, retry_after: float = 30.0) -> None:
        self.limit = limit
        self.window = window
        self._client: Any = (
            redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5) if redis_url else None
        )
        self._redis_down_until = 0.0
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int], int] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def check(self, key_id: str) -> None:
        """Count one request of key_id; ApiError 429 with Retry-After when the window's limit is passed."""
        if not self.enabled:
            return
        now = time.time()
        number = int(now // self.window)
        count = self._count_in_redis(key_id, number)
        if count is None:
            count = self._count_here(key_id, number)
        if count > self.limit:
            retry = max(1, math.ceil((number + 1) * self.window - now))
            raise ApiError(
                429,
                "rate_limited",
                f"more than {self.limit} requests in {self.window} s for this key (VLSEARCH_RATE_LIMIT): "
                f"retry in {retry} s",
                {"Retry-After": str(retry)},
            )

    def _count_in_redis(self, key_id: str, number: int) -> int | None:
        if self._client is None or time.monotonic() < self._redis_down_until:
            return None
        key = f"vlsearch:ratelimit:{key_id}:{number}"
        try:
            pipe = self._client.pipeline()
            pipe.incr(key)
            pipe.expire(key, self.window + 1)
            count, _ = pipe.execute()
            return int(count)
        except redis.RedisError as error:
            self._redis_down_until = time.monotonic() + self._retry_after
            log.warning("rate limit counted in this process: Redis is not reachable (%s)", error)
            return None

    def _count_here(self, key_id: str, number: int) -> int:
        with self._lock:
            if len(self._counts) > 10_000:  # old windows go; the current ones stay
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= number}
            count = self._counts.get((key_id, number), 0) + 1
            self._counts[(key_id, number)] = count
            return count
