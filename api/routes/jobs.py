"""Jobs on the workers: submit (index, tag, caption), list, follow, cancel. Thin shells over workers.api.Jobs."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi import Path as PathParam

from api.deps import JobsDep, Principal, ReadAccess, SettingsDep, WriteAccess, visible
from api.errors import ApiError
from api.json_body import JsonRoute
from api.routes.search import ERRORS
from api.schemas import JOB_ID_PATTERN, CaptionJobCreate, IndexJobCreate, JobCreate, JobList, JobOut, TagJobCreate
from core.media import write_atomically
from core.service import InvalidQuery
from core.settings import Settings
from workers.jobs import JobNotFound, JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS, route_class=JsonRoute)

JobIdPath = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="The job's id (32 hex digits).")]

VOCABULARIES_DIR = "vocabularies"  # labels given inline, kept content-addressed where the workers read them
MAX_VOCABULARY_BYTES = 16 * 1024 * 1024  # of a label file named by labels_file


def _out(record: JobRecord) -> JobOut:
    return JobOut(**record.to_dict())


def _vocabulary_file(settings: Settings, labels: list[str]) -> Path:
    """Inline labels as a vocabulary file (one label a line) under the data dir, which the workers share."""
    if any("\n" in label or "\r" in label for label in labels):
        raise InvalidQuery("a label cannot hold a line break")
    text = "".join(f"{label.strip()}\n" for label in labels)
    path = settings.data_dir / VOCABULARIES_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.txt"
    if not path.exists():
        write_atomically(path, text.encode("utf-8"))
    return path


def _inside_roots(settings: Settings, name: str, what: str) -> Path:
    """name, when VLSEARCH_INDEX_ROOTS is empty or holds a folder it lies in once links are resolved; else a 403
    (said before anything about the path, so that a client learns nothing of what lies outside)."""
    path = Path(name)
    if settings.index_roots:
        if "\x00" in name:  # realpath would raise ValueError
            raise InvalidQuery(f"{what} {name!r} holds a NUL character")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(os.path.realpath(root)) for root in settings.index_roots):
            raise ApiError(
                403,
                "path_not_allowed",
                f"{what} {name!r} is outside the folders this server indexes (VLSEARCH_INDEX_ROOTS)",
            )
    return path


def _label_file(path: Path) -> Path:
    """A vocabulary file a client names: a regular file of a bounded size. Not /dev/zero, a FIFO or /dev/stdin,
    which the request would read for ever or wait on (what is missing, load_vocabulary reports)."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return path
    if not stat.S_ISREG(info.st_mode):
        raise InvalidQuery(f"labels_file {str(path)!r} is not a regular file")
    if info.st_size > MAX_VOCABULARY_BYTES:
        raise InvalidQuery(f"labels_file {str(path)!r} is larger than {MAX_VOCABULARY_BYTES} bytes")
    return path


def _owned(principal: Principal, record: JobRecord) -> JobRecord:
    """A job of a collection the caller may not see is answered as missing."""
    if not principal.may_access(record.collection):
        raise JobNotFound(f"no job {record.id!r}")
    return record


@router.post("", status_code=202, summary="Submit an index, tag or caption job")
def submit_job(
    body: Annotated[JobCreate, Body(discriminator="kind")],
    principal: WriteAccess,
    jobs: JobsDep,
    settings: SettingsDep,
) -> JobOut:
    collection = visible(principal, body.collection or settings.collection)
    if isinstance(body, IndexJobCreate):
        # one of the two: paths (folders and files on the server) or image URLs (fetched by the workers)
        paths = [_inside_roots(settings, path, "path") for path in body.paths]
        return _out(jobs.submit_index(paths, collection, urls=body.urls))
    if isinstance(body, TagJobCreate):
        if body.labels is not None and body.labels_file is not None:
            raise InvalidQuery("give labels or labels_file, not both")
        labels = _vocabulary_file(settings, body.labels) if body.labels else None
        labels = _label_file(_inside_roots(settings, body.labels_file, "labels_file")) if body.labels_file else labels
        return _out(jobs.submit_tag(collection, labels, body.threshold, verify=body.verify))
    assert isinstance(body, CaptionJobCreate)
    return _out(jobs.submit_caption(collection, body.force))


@router.get("", summary="Jobs, newest first (of the collections this key may see)")
def list_jobs(
    principal: ReadAccess,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
) -> JobList:
    return JobList(jobs=[_out(record) for record in jobs.list(limit) if principal.may_access(record.collection)])


@router.get("/{job_id}", summary="A job's state and progress")
def get_job(job_id: JobIdPath, principal: ReadAccess, jobs: JobsDep) -> JobOut:
    return _out(_owned(principal, jobs.get(job_id)))


@router.delete("/{job_id}", summary="Cancel a job (its remaining chunks end without work)")
def cancel_job(job_id: JobIdPath, principal: WriteAccess, jobs: JobsDep) -> JobOut:
    _owned(principal, jobs.get(job_id))
    return _out(jobs.cancel(job_id))
