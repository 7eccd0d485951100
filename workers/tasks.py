"""Celery tasks: thin shells over core's service layer, one chunk of a job each; they know nothing of HTTP.

Each task: end without work when the job was cancelled; count this delivery and give the chunk up once it has
killed its worker VLSEARCH_MAX_CHUNK_ATTEMPTS times; mark the job running; do the work through the Service of this
pool child (stores and models opened in the child, on first use); count the result once (workers/jobs.py).
Ids are content hashes, so doing a chunk again rewrites the same points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.container import build_settings
from core.service import Service
from workers.app import app
from workers.jobs import FileError, JobStore

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


@app.task(name="workers.tasks.index_chunk", bind=True)
def index_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, paths: list[str], options: dict[str, Any] | None = None
) -> dict[str, int]:
    """Index one chunk of files into collection; failures are counted per file, the chunk goes on."""
    if not _begin(job_id, chunk_id, len(paths)):
        return {"done": 0, "failed": 0}
    result = service().index([Path(path) for path in paths], collection)
    failures = [FileError(failure.path, failure.error, failure.reason) for failure in result.report.failed]
    job_store().count_chunk(job_id, chunk_id, done=len(paths), failed=len(failures), errors=failures)
    return {"done": len(paths), "failed": len(failures)}


@app.task(name="workers.tasks.tag_chunk", bind=True)
def tag_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, ids: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Tag one chunk of stored images from their vectors; checks for cancel between batches."""
    if not _begin(job_id, chunk_id, len(ids)):
        return {"done": 0, "failed": 0}
    report = service().tag(
        ids,
        collection,
        vocabulary=options.get("labels"),
        threshold=options.get("threshold"),
        should_stop=lambda: job_store().is_cancelled(job_id),
    )
    if report.stopped:
        return {"done": 0, "failed": 0}
    errors = [FileError(image_id, "PointNotFound", "deleted before it was tagged") for image_id in report.missing]
    job_store().count_chunk(job_id, chunk_id, done=len(ids), failed=len(errors), errors=errors)
    return {"done": len(ids), "failed": len(errors), "tagged": report.tagged}


@app.task(name="workers.tasks.caption_chunk", bind=True)
def caption_chunk(
    self: Any, job_id: str, chunk_id: str, collection: str, ids: list[str], options: dict[str, Any]
) -> dict[str, int]:
    """Caption the images of one chunk that lack a caption of the current generative model (all with force)."""
    if not _begin(job_id, chunk_id, len(ids)):
        return {"done": 0, "failed": 0}
    todo = ids if options.get("force") else service().uncaptioned(ids, collection)
    if todo:
        service().caption(todo, collection, refresh=bool(options.get("force")))
    job_store().count_chunk(job_id, chunk_id, done=len(ids), failed=0)
    return {"done": len(ids), "failed": 0, "captioned": len(todo)}
