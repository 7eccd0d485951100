"""Job records on the machine's real Redis (database 7, a key prefix of each test's own): progress counted once per
chunk however often it is delivered, from several processes at once; cancel and fail end a job once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from indexer.errors import StoreUnavailable
from workers import jobs
from workers.jobs import FileError, JobNotFound, JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("VLSEARCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


@pytest.fixture
def store() -> Iterator[JobStore]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"the tests need Redis at {REDIS_URL} (.ci/run starts one)")
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    yield JobStore(client, prefix=prefix)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_a_job_runs_and_is_done_when_its_last_chunk_is_counted(store: JobStore) -> None:
    job = store.create("index", "photos", "/photos", {"recursive": True}, total=10, chunks=3)
    assert (job.state, job.total, job.done, job.chunks, job.started) == ("queued", 10, 0, 3, None)
    assert store.start(job.id) and not store.start(job.id)
    assert store.count_chunk(job.id, "c0", done=4, failed=1, errors=[FileError("/photos/x.jpg", "CorruptImage", "bad")])
    assert store.count_chunk(job.id, "c1", done=4, failed=0)
    assert store.get(job.id).state == "running"
    assert store.count_chunk(job.id, "c2", done=2, failed=0)
    done = store.get(job.id)
    assert (done.state, done.done, done.failed, done.chunks_done) == ("done", 10, 1, 3)
    assert done.errors == [FileError("/photos/x.jpg", "CorruptImage", "bad")]
    assert done.finished is not None and done.rate is not None and done.rate > 0
    assert done.options == {"recursive": True} and done.to_dict()["rate"] == done.rate
    for part in (":chunks", ":errors"):  # nothing a job leaves in Redis outlives it
        assert 0 < store.client.ttl(f"{store.prefix}job:{job.id}{part}") <= store.ttl


def test_a_chunk_delivered_twice_is_counted_once(store: JobStore) -> None:
    job = store.create("index", "photos", "/photos", {}, total=8, chunks=2)
    assert store.count_chunk(job.id, "c0", done=4, failed=0)
    assert not store.count_chunk(job.id, "c0", done=4, failed=0, errors=[FileError("a", "E", "again")])
    record = store.get(job.id)
    assert (record.done, record.chunks_done, record.errors, record.state) == (4, 1, [], "queued")


COUNTER = """
import sys
from workers.jobs import JobStore
store = JobStore.from_url(sys.argv[1], prefix=sys.argv[2])
for chunk in range(int(sys.argv[4])):
    store.count_chunk(sys.argv[3], f"c{chunk}", done=10, failed=1)
"""


def test_processes_counting_the_same_chunks_at_once_count_each_once(store: JobStore) -> None:
    chunks = 60
    job = store.create("index", "photos", "/photos", {}, total=10 * chunks, chunks=chunks)
    store.start(job.id)
    counters = [
        subprocess.Popen(
            [sys.executable, "-c", COUNTER, REDIS_URL, store.prefix, job.id, str(chunks)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        for _ in range(4)
    ]
    for counter in counters:
        assert counter.wait(timeout=120) == 0
    record = store.get(job.id)
    assert (record.done, record.failed, record.chunks_done, record.state) == (10 * chunks, chunks, chunks, "done")


def test_the_error_list_is_bounded_while_the_counts_stay_exact(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "MAX_ERRORS", 5)
    job = store.create("index", "photos", "/photos", {}, total=12, chunks=3)
    for chunk in range(3):
        errors = [FileError(f"/p/{chunk}-{i}.jpg", "CorruptImage", "bad") for i in range(4)]
        store.count_chunk(job.id, f"c{chunk}", done=4, failed=4, errors=errors)
    record = store.get(job.id)
    assert record.failed == 12 and len(record.errors) == 5
    kept = ["/p/0-0.jpg", "/p/0-1.jpg", "/p/0-2.jpg", "/p/0-3.jpg", "/p/1-0.jpg"]  # the first ones, in order
    assert [error.source for error in record.errors] == kept


def test_cancel_ends_a_job_once_and_later_chunks_do_not_make_it_done(store: JobStore) -> None:
    job = store.create("tag", "photos", "photos", {}, total=4, chunks=2)
    store.start(job.id)
    assert not store.is_cancelled(job.id)
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.reason == "cancelled by request" and store.is_cancelled(job.id)
    store.count_chunk(job.id, "c0", done=2, failed=0)
    store.count_chunk(job.id, "c1", done=2, failed=0)
    assert store.get(job.id).state == "cancelled"
    assert not store.fail(job.id, "too late") and store.get(job.id).state == "cancelled"


def test_a_failed_job_keeps_its_reason_and_attempts_are_counted_per_chunk(store: JobStore) -> None:
    job = store.create("caption", "photos", "photos", {}, total=4, chunks=2)
    assert [store.attempt(job.id, "c0") for _ in range(3)] == [1, 2, 3] and store.attempt(job.id, "c1") == 1
    assert store.fail(job.id, "chunk c0 killed its worker 3 times")
    record = store.get(job.id)
    assert (record.state, record.reason) == ("failed", "chunk c0 killed its worker 3 times")


def test_a_job_without_chunks_is_done_at_once_and_jobs_are_listed_newest_first(store: JobStore) -> None:
    first = store.create("index", "a", "/empty", {}, total=0, chunks=0)
    second = store.create("index", "b", "/photos", {}, total=3, chunks=1)
    assert store.get(first.id).state == "done"
    assert [record.id for record in store.list()] == [second.id, first.id]


def test_an_unknown_job_and_an_unreachable_redis_are_typed_errors(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.count_chunk("nope", "c0", 1, 0)
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = JobStore.from_url(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StoreUnavailable, match="VLSEARCH_REDIS_URL"):
        unreachable.get("any")
