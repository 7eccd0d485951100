"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not clash).

Requests and latency per route template (never the raw path: ids and collection names stay out of the labels) and
status; search latency by mode and by whether it reranked and captioned; ask latency; and, read from Redis at each
scrape when jobs are configured, the depth of the Celery queues and the jobs by state.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
JOBS_SCANNED = 200  # the newest jobs counted by state at each scrape (one Redis read each)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vlsearch_http_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vlsearch_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.search = Histogram(
            "vlsearch_search_duration_seconds",
            "Search latency in the service (query image decoding included), by mode, rerank and captions.",
            ["mode", "rerank", "captions"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ask = Histogram(
            "vlsearch_ask_duration_seconds",
            "Latency of questions to the generative model.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_search(self, mode: str, rerank: bool, captions: bool, seconds: float) -> None:
        self.search.labels(mode, str(rerank).lower(), str(captions).lower()).observe(seconds)

    def watch_jobs(
        self, redis_client: Callable[[], Any], queues: tuple[str, ...], job_states: Callable[[], Any]
    ) -> None:
        """Add the queue depth and jobs-by-state gauges, read at each scrape (Redis errors: no sample)."""
        self.registry.register(_JobsCollector(redis_client, queues, job_states))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _JobsCollector(Collector):
    def __init__(self, redis_client: Callable[[], Any], queues: tuple[str, ...], job_states: Callable[[], Any]) -> None:
        self._client = redis_client
        self._queues = queues
        self._job_states = job_states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("vlsearch_redis_up", "Whether Redis answered this scrape.")
        depth = GaugeMetricFamily("vlsearch_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"])
        jobs = GaugeMetricFamily("vlsearch_jobs", f"The newest {JOBS_SCANNED} jobs by state.", labels=["state"])
        try:
            client = self._client()
            pipe = client.pipeline()
            for queue in self._queues:
                pipe.llen(queue)
            lengths = pipe.execute()
            states = Tally(self._job_states())
        except Exception:  # a scrape must not fail because Redis is away
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for queue, length in zip(self._queues, lengths, strict=True):
            depth.add_metric([queue], int(length))
        for state in JOB_STATES:
            jobs.add_metric([state], states.get(state, 0))
        yield from (up, depth, jobs)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected at each scrape only (no Redis call at registration)


class MetricsMiddleware:
    """Counts every request by the template of the route it matched ("unmatched" otherwise) and its status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "?")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
