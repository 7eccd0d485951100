"""Searches through the API while a real worker job (a `vlsearch worker` subprocess, submitted with POST /v1/jobs)
writes to the same collection: every answer is a 200, counts only grow, and the job's images all arrive.

Its own server and Redis database (12), so that the worker takes no task another API test queued."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import (
    Keys,
    Server,
    Template,
    copy_data,
    server_env,
    start_server,
    stop_server,
)
from tests.processes import start_worker, stop

WORKER_REDIS = "redis://127.0.0.1:6379/12"


@pytest.fixture(scope="module")
def job_server(template: Template, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(WORKER_REDIS).flushdb()
    root = tmp_path_factory.mktemp("api-worker")
    server = start_server(
        copy_data(template, root / "data"), root / "server.log", redis_url=WORKER_REDIS, chunk_size="4"
    )
    yield server
    stop_server(server)


@pytest.mark.slow
def test_searches_while_a_worker_job_writes_see_a_consistent_collection(
    job_server: Server, keys: Keys, tmp_path: Path
) -> None:
    folder = tmp_path / "arriving"
    write_collection(generate_scenes("test", 40, seed=77), folder, size=64)
    env = server_env(job_server.data_dir, redis_url=WORKER_REDIS, chunk_size="4")
    # chunks start half a second late (tests/workers/slow_chunks.py): the job lasts long enough to search during
    worker = start_worker(env, tmp_path / "worker.log", include=["tests.workers.slow_chunks"])
    counts: list[int] = []
    try:
        with job_server.client(keys.write) as client:
            submitted = client.post(
                "/v1/jobs", json={"kind": "index", "collection": "arriving", "paths": [str(folder)]}
            )
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}")
                assert job.status_code == 200, job.text
                if job.json()["state"] in ("done", "failed", "cancelled"):
                    break
                info = client.get("/v1/collections/arriving")
                if info.status_code == 404:  # the worker has not created it yet
                    continue
                search = client.post("/v1/search", json={"text": "a red circle", "collection": "arriving", "k": 50})
                after = client.get("/v1/collections/arriving")
                assert {info.status_code, search.status_code, after.status_code} == {200}, search.text
                hits = search.json()["hits"]
                assert len({hit["id"] for hit in hits}) == len(hits) <= after.json()["count"]  # no hit twice
                counts += [info.json()["count"], after.json()["count"]]
                time.sleep(0.1)
            assert job.json()["state"] == "done" and job.json()["done"] == 40, job.json()
            final = client.get("/v1/collections/arriving").json()["count"]
    finally:
        stop(worker, timeout=0)  # SIGKILL at once: the job is over or the test failed
    assert counts == sorted(counts) and final == 40, counts
    assert len(counts) >= 3 and counts[0] < 40, f"the searches did not overlap the job: {counts}"
