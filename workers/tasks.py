"""Celery tasks: thin shells over core's service layer, one chunk of a job each; they know nothing of HTTP.

Each task: end without work when the job was cancelled; count this delivery and give the chunk up once it has
killed its worker VLSEARCH_MAX_CHUNK_ATTEMPTS times; mark the job running; do the work through the Service of this
pool child (stores and models opened in the child, on first use); count the result once (workers/jobs.py).
Ids are content hashes, so doing a chunk again rewrites the same points.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import Reject

from core.container import build_settings
from core.service import IndexResult, Service, StorageFull
from indexer.errors import VlsearchError
from workers.app import app
from workers.jobs import FileError, JobStore

logger = logging.getLogger(__name__)
RETRY_SECONDS = 2.0  # a busy store or a broker that blinked: try the chunk again soon (another attempt)

_SERVICE: tuple[int, Service] | None = None  # this process's, made in the pool child that runs tasks
_JOBS: tuple[int, JobStore] | None = None


def service() -> Service:
    """The Service of this process: built on first use in each pool child, never inherited from the parent."""
    global _SERVICE
    if _SERVICE is None or _SERVICE[0] != os.getpid():
        _SERVICE = (os.getpid(), Service(build_settings()))
    return _SERVICE[1]


def job_store() -> JobStore:
    global _JOBS
    if _JOBS is None or _JOBS[0] != os.getpid():
        _JOBS = (os.getpid(), JobStore.from_url(service().settings.redis_url))
    return _JOBS[1]


def _begin(job_id: str, chunk_id: str, size: int) -> bool:
    """Whether this delivery of the chunk should do its work (see the module docstring)."""
    jobs = job_store()
    if jobs.is_cancelled(job_id):
        return False
    attempts = jobs.attempt(job_id, chunk_id)
    limit = service().settings.max_chunk_attempts
    if attempts > limit:
        reason = f"chunk {chunk_id} was delivered {attempts - 1} times and never finished (VLSEARCH_MAX_CHUNK_ATTEMPTS)"
        jobs.count_chunk(job_id, chunk_id, done=size, failed=size, errors=[FileError(chunk_id, "ChunkFailed", reason)])
        return False
    jobs.start(job_id)
    return True


def _guarded(task: Any, job_id: str, chunk_id: str, size: int, work: Callable[[], dict[str, int]]) -> dict[str, int]:
    """Run a chunk's work so that its job always ends: a store or broker that is busy or unreachable for a moment
    sends the chunk round again (counted as an attempt, so VLSEARCH_MAX_CHUNK_ATTEMPTS bounds it); a full disk or
    any other error fails this chunk's items with the reason, and the job goes on."""
    try:
        return work()
    except StorageFull as error:  # not a blink: retrying at once would fail alike
        reason = str(error)
    except VlsearchError as error:
        if error.category == "unavailable":
            try:
                raise task.retry(exc=error, countdown=RETRY_SECONDS) from error
            except Reject as refused:
                # Celery drops the message when the retry cannot be sent (Redis itself is down): put it back, or
                # the job would wait for this chunk forever (unsent, it comes back once the broker does)
                raise Reject(refused.reason, requeue=True) from error
        reason = str(error)
    except Exception as error:  # a bug or an unforeseen failure: logged, reported, the chunk given up
        logger.exception("chunk %s of job %s failed", chunk_id, job_id)
        reason = f"{type(error).__name__}: {error}"
    job_store().count_chunk(
        job_id, chunk_id, done=size, failed=size, errors=[FileError(chunk_id, "ChunkFailed", reason)]
    )
    return {"done": size, "failed": size}


@app.task(name="workers.tasks.index_chunk", bind=True, max_retries=None)
def index_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, items: list[str], options: dict[str, Any] | None = None
) -> dict[str, int]:
    """Index one chunk of files (or, with options `urls`, of image URLs through the safe fetcher) into collection;
    failures are counted per file or URL, the chunk goes on."""
    if not _begin(job_id, chunk_id, len(items)):
        return {"done": 0, "failed": 0}

    def work() -> dict[str, int]:
        result: IndexResult | None
        failures: list[FileError]
        if (options or {}).get("urls"):
            result, failures = service().index_urls(items, collection), []
        else:
            # A listing's missing files fail alone; a link that leads nowhere (dangling, a loop) is the pipeline's
            # to report, as `vlsearch index` does (UnreadableFile, with why).
            gone = {path for path in items if not Path(path).exists() and not Path(path).is_symlink()}
            present = [path for path in items if path not in gone]
            failures = [FileError(path, "FileNotFound", "no such file") for path in items if path in gone]
            result = service().index(present, collection) if present else None
        if result is not None:
            failures += [FileError(failure.path, failure.error, failure.reason) for failure in result.report.failed]
        job_store().count_chunk(job_id, chunk_id, done=len(items), failed=len(failures), errors=failures)
        return {"done": len(items), "failed": len(failures)}

    return _guarded(self, job_id, chunk_id, len(items), work)


@app.task(name="workers.tasks.tag_chunk", bind=True, max_retries=None)
def tag_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, ids: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Tag one chunk of stored images from their vectors (verified by the generative model with options `verify`);
    checks for cancel between batches."""
    if not _begin(job_id, chunk_id, len(ids)):
        return {"done": 0, "failed": 0}
    return _guarded(self, job_id, chunk_id, len(ids), lambda: _tag(job_id, chunk_id, collection, ids, options))


def _tag(job_id: str, chunk_id: str, collection: str, ids: list[str], options: dict[str, Any]) -> dict[str, int]:
    report = service().tag(
        ids,
        collection,
        vocabulary=options.get("labels"),
        threshold=options.get("threshold"),
        should_stop=lambda: job_store().is_cancelled(job_id),
        verify=bool(options.get("verify")),
    )
    if report.stopped:
        return {"done": 0, "failed": 0}
    errors = [FileError(image_id, "PointNotFound", "deleted before it was tagged") for image_id in report.missing]
    errors += [
        FileError(image_id, "ImageUnavailable", "its image could not be loaded to verify its tags; tags unchanged")
        for image_id in report.unverified
    ]
    job_store().count_chunk(job_id, chunk_id, done=len(ids), failed=len(errors), errors=errors)
    return {"done": len(ids), "failed": len(errors), "tagged": report.tagged}


@app.task(name="workers.tasks.caption_chunk", bind=True, max_retries=None)
def caption_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, ids: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Caption the images of one chunk that lack a caption of the current generative model (all with force)."""
    if not _begin(job_id, chunk_id, len(ids)):
        return {"done": 0, "failed": 0}

    def work() -> dict[str, int]:
        todo = ids if options.get("force") else service().uncaptioned(ids, collection)
        if todo:
            service().caption(todo, collection, refresh=bool(options.get("force")))
        job_store().count_chunk(job_id, chunk_id, done=len(ids), failed=0)
        return {"done": len(ids), "failed": 0, "captioned": len(todo)}

    return _guarded(self, job_id, chunk_id, len(ids), work)
