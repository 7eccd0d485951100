"""Load: many concurrent clients of mixed traffic against a real `vlsearch serve` while a worker indexes into the
collection they search. Bounded in time, loopback only, not in CI.

    .venv/bin/python bench/load.py [--clients 50] [--seconds 60] [--scenes 500] [--index-images 6000]
        [--mix search=40,rerank=5,upload=20,similar=20,job=15] [--rerank-k 5] [--chunk-size 100] [--seed 0]

A shapes-world collection (shapes-clip, shapes-vlm on CPU) is indexed in-process into a temporary data dir; then
one `vlsearch serve` (bench/api.py's, jobs on Redis database 6 of VLSEARCH_BENCH_REDIS, default
redis://127.0.0.1:6379/6, flushed before and after) and one `vlsearch worker` (bench/workers.py's) run on it. An
index job of --index-images new scenes into the same collection is submitted through the API just before the
clients start. Each client, an asyncio task of this process with an httpx client of its own (one keep-alive
connection), picks its next route by a seeded weighted choice:
  search   POST /v1/search, text, k 10
  rerank   POST /v1/search, text, k 5, rerank with rerank_k --rerank-k (the generative model, on the CPU)
  upload   POST /v1/search/image, a PNG scene uploaded (multipart), k 10
  similar  GET  /v1/collections/shapes/images/{id}/similar, k 10, a random stored id
  job      GET  /v1/jobs/{id}, the running index job
No client starts a request after --seconds; those in flight are waited for. A request with no answer (reset,
protocol error, the 120 s client timeout) is dropped. Exits 1 on any 5xx, any dropped request, any other answer
than 200, or an index job that did not end done with every image in the collection.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: its folder comes first on sys.path, and bench/api.py would shadow `api`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx
import redis

from bench.api import (
    COLLECTION,
    bench_settings,
    machine_busy_seconds,
    own_cpu_seconds,
    percentile,
    process_cpu_seconds,
    process_stat,
    server,
    server_env,
    stat_cpu_seconds,
)
from bench.workers import Workers
from core.keys import KeyStore
from core.service import Service
from models.shapes_world import QUERY_KINDS, generate_scenes, queries, render, write_collection

ROUTES = ("search", "rerank", "upload", "similar", "job")
DEFAULT_MIX = "search=40,rerank=5,upload=20,similar=20,job=15"
CLIENT_TIMEOUT = 120.0  # seconds: a rerank queued behind others on 2 cores is slow, not dropped
JOB_TIMEOUT = 900.0  # seconds the index job may take after the load ends


@dataclass
class RouteStats:
    statuses: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # no answer, by exception class
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.dropped.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def unexpected(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)


@dataclass
class Traffic:
    """What the clients send: query texts, uploads, stored ids, the job to follow."""

    texts: list[str]
    uploads: list[bytes]
    image_ids: list[str]
    job_id: str
    rerank_k: int


def parse_mix(text: str) -> dict[str, float]:
    weights = {name: 0.0 for name in ROUTES}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in weights:
            raise SystemExit(f"--mix: unknown route {name.strip()!r}; known: {', '.join(ROUTES)}")
        weights[name.strip()] = float(weight)
    if sum(weights.values()) <= 0:
        raise SystemExit("--mix: no route has a weight")
    return weights


def png_bytes(count: int) -> list[bytes]:
    """Query images to upload: scenes of another seed than the collection's, as PNG."""
    uploads = []
    for scene in generate_scenes("test", count, seed=99):
        buffer = io.BytesIO()
        render(scene, 64).save(buffer, format="PNG")
        uploads.append(buffer.getvalue())
    return uploads


async def send(client: httpx.AsyncClient, route: str, traffic: Traffic, rng: random.Random) -> httpx.Response:
    if route == "search":
        body = {"collection": COLLECTION, "text": rng.choice(traffic.texts), "k": 10}
        return await client.post("/v1/search", json=body)
    if route == "rerank":
        body = {"collection": COLLECTION, "text": rng.choice(traffic.texts), "k": 5, "rerank": True}
        return await client.post("/v1/search", json={**body, "rerank_k": traffic.rerank_k})
    if route == "upload":
        files = {"file": ("query.png", rng.choice(traffic.uploads), "image/png")}
        return await client.post("/v1/search/image", files=files, data={"collection": COLLECTION, "k": "10"})
    if route == "similar":
        image_id = rng.choice(traffic.image_ids)
        return await client.get(f"/v1/collections/{COLLECTION}/images/{image_id}/similar", params={"k": 10})
    return await client.get(f"/v1/jobs/{traffic.job_id}")


async def client_loop(
    number: int,
    client: httpx.AsyncClient,
    traffic: Traffic,
    mix: dict[str, float],
    seed: int,
    deadline: float,
    stats: dict[str, RouteStats],
) -> None:
    rng = random.Random(seed * 1000 + number)
    names, weights = list(mix), list(mix.values())
    while time.monotonic() < deadline:
        route = rng.choices(names, weights)[0]
        began = time.perf_counter()
        try:
            answer = await send(client, route, traffic, rng)
        except httpx.TransportError as error:  # timeouts, resets, protocol errors: no answer
            stats[route].dropped[type(error).__name__] += 1
            continue
        stats[route].latencies.append(time.perf_counter() - began)
        stats[route].statuses[answer.status_code] += 1
        if answer.status_code == 200 and route != "job" and "hits" not in answer.json():
            raise SystemExit(f"{route}: a 200 without hits: {answer.text[:300]}")


async def load(
    base_url: str, key: str, traffic: Traffic, mix: dict[str, float], clients: int, seconds: float, seed: int
) -> tuple[dict[str, RouteStats], float]:
    """Every client's loop until the deadline, those in flight finished; the stats per route and the wall time."""
    stats = {name: RouteStats() for name in ROUTES}
    # One client of one keep-alive connection each, as users are: one pool of 50 connections cost this process
    # 6.5 ms of CPU a request (httpcore scans every connection for every request), a quarter of the machine.
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"X-API-Key": key}
    pool = [
        httpx.AsyncClient(base_url=base_url, headers=headers, limits=one, timeout=CLIENT_TIMEOUT)
        for _ in range(clients)
    ]
    try:
        began = time.monotonic()
        loops = [client_loop(n, client, traffic, mix, seed, began + seconds, stats) for n, client in enumerate(pool)]
        await asyncio.gather(*loops)
        return stats, time.monotonic() - began
    finally:
        await asyncio.gather(*(client.aclose() for client in pool))


def collection_count(api: httpx.Client) -> int:
    return int(api.get(f"/v1/collections/{COLLECTION}").raise_for_status().json()["count"])


def wait_for_job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        record: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if record["state"] in ("done", "failed", "cancelled"):
            return record
        time.sleep(1.0)
    raise SystemExit(f"the index job {job_id} did not end within {JOB_TIMEOUT:.0f} s")


def group_cpu_seconds(group: int) -> float:
    """CPU seconds so far of the live processes of a process group (a worker and its pool children)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = process_stat(stat.parent.name)
        except OSError:  # ended since the listing
            continue
        if int(fields[2]) == group:
            total += stat_cpu_seconds(fields)
    return total


def table(stats: dict[str, RouteStats], wall: float) -> list[str]:
    lines = [
        "| route | requests | req/s | p50 ms | p99 ms | status codes | dropped |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    every = RouteStats()
    for name, route in [*stats.items(), ("all", every)]:
        if name != "all":
            every.statuses.update(route.statuses)
            every.dropped.update(route.dropped)
            every.latencies.extend(route.latencies)
        if not route.requests:
            continue
        p50, p99 = (f"{percentile(route.latencies, q) * 1000:.0f}" if route.latencies else "-" for q in (50, 99))
        codes = ", ".join(f"{status}: {count}" for status, count in sorted(route.statuses.items()))
        dropped = ", ".join(f"{kind}: {count}" for kind, count in route.dropped.items()) or "0"
        lines.append(
            f"| {name} | {route.requests} | {route.requests / wall:.1f} | {p50} | {p99} | {codes} | {dropped} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scenes", type=int, default=500, help="scenes in the collection before the job")
    parser.add_argument("--index-images", type=int, default=6000, help="new scenes the worker indexes meanwhile")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="route weights")
    parser.add_argument("--rerank-k", type=int, default=5, help="candidates the generative model rescores")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per task: a commit to the store each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mix = parse_mix(args.mix)

    redis_url = os.environ.get("VLSEARCH_BENCH_REDIS", "redis://127.0.0.1:6379/6")
    jobs_db = redis.Redis.from_url(redis_url)
    jobs_db.flushdb()  # the benchmark's own database
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores, shared with the server, the worker and whatever else runs")
    texts = [text for kind in QUERY_KINDS for text in queries(kind)]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            write_collection(generate_scenes("test", args.scenes, seed=3), root / "scenes", size=64)
            # The same seed, later scene numbers: none of them is in the collection yet.
            new_scenes = root / "new-scenes"
            write_collection(generate_scenes("test", args.index_images, seed=3, start=args.scenes), new_scenes, 64)
            warm = write_collection(generate_scenes("test", 8, seed=98), root / "warm", 64)
            settings = bench_settings(root / "data")
            with Service(settings) as service:
                service.index([root / "scenes"], COLLECTION)
                image_ids = service.point_ids(COLLECTION)
            key = KeyStore.from_settings(settings).create("read,write", name="load").secret
            extra = {"VLSEARCH_REDIS_URL": redis_url, "VLSEARCH_CHUNK_SIZE": str(args.chunk_size)}
            worker_env = server_env(settings.data_dir, extra=extra)
            server_log, worker_log = root / "server.log", root / "worker.log"
            with (
                server(settings.data_dir, server_log, extra=extra) as (base_url, server_pid),
                Workers(worker_env, [None], worker_log) as workers,
                httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=CLIENT_TIMEOUT) as api,
            ):
                # The worker's pool child loads the encoder at its first task: done here, before anything counts.
                warm_up = api.post("/v1/jobs", json={"kind": "index", "collection": "warm-up", "paths": [str(warm)]})
                wait_for_job(api, str(warm_up.raise_for_status().json()["id"]))
                before = collection_count(api)
                submitted = api.post("/v1/jobs", json={"kind": "index", "paths": [str(new_scenes)]})
                job_id = str(submitted.raise_for_status().json()["id"])
                traffic = Traffic(texts, png_bytes(20), image_ids, job_id, args.rerank_k)
                worker_group = workers.processes[0].pid
                cpu_before = (own_cpu_seconds(), process_cpu_seconds(server_pid), group_cpu_seconds(worker_group))
                busy_before = machine_busy_seconds()
                window_start = time.time()
                stats, wall = asyncio.run(load(base_url, key, traffic, mix, args.clients, args.seconds, args.seed))
                window_end = time.time()
                busy = machine_busy_seconds() - busy_before
                cpu_after = (own_cpu_seconds(), process_cpu_seconds(server_pid), group_cpu_seconds(worker_group))
                during = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                record = wait_for_job(api, job_id)
                after = collection_count(api)
            server_errors = [line for line in server_log.read_text().splitlines() if "Traceback" in line]
    finally:
        jobs_db.flushdb()
        jobs_db.close()

    print(
        f"\n{args.clients} clients, {args.seconds:g} s (wall {wall:.1f} s with the requests in flight), mix {args.mix}"
    )
    print("\n".join(table(stats, wall)))
    own, served, indexed = (after_ - before_ for after_, before_ in zip(cpu_after, cpu_before, strict=True))
    others = busy - served - indexed - own
    window = window_end - window_start  # the clients' set-up too
    print(
        f"\nCPU over the window: the machine {busy:.0f} of {window * cores:.0f} core-s busy; the server {served:.0f}, "
        f"the worker {indexed:.0f}, the clients (this process) {own:.0f}, other processes {others:.0f}"
    )
    started, finished = record["started"] or window_end, record["finished"] or window_end
    overlap = max(0.0, min(window_end, finished) - max(window_start, started))
    print(
        f"index job: {record['state']}, {record['done']} of {record['total']} images done, {record['failed']} failed, "
        f"{record['chunks_done']} of {record['chunks']} chunks, {finished - started:.1f} s from start to finish; "
        f"{overlap:.1f} s of the {window_end - window_start:.1f} s load window indexing, "
        f"{during['done']} images done by its end ({during['done'] / max(overlap, 1e-9):.0f} images/s under load, "
        f"{indexed / max(during['done'], 1) * 1000:.1f} worker CPU-ms an image)"
    )
    if finished > window_end:  # counted per chunk: a chunk's images at once
        rest = record["done"] - during["done"]
        print(
            f"  after the load: {rest} images in {finished - window_end:.1f} s ({rest / (finished - window_end):.0f}/s)"
        )
    print(f"collection {COLLECTION!r}: {before} images before, {after} after (+{after - before})")
    print(f"server log: {len(server_errors)} tracebacks")

    problems = []
    for name, route in stats.items():
        if route.server_errors or route.dropped or route.unexpected:
            problems.append(
                f"{name}: {route.server_errors} 5xx, {sum(route.dropped.values())} dropped, {route.unexpected} not 200"
            )
    if record["state"] != "done" or record["failed"] or after - before != args.index_images:
        problems.append(f"index job: {record['state']}, {record['failed']} failed, {after - before} images added")
    print("result: " + ("; ".join(problems) if problems else "zero 5xx, zero dropped, every answer 200, job exact"))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
