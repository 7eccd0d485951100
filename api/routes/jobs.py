"""Jobs on the workers: submit (index, tag, caption), list, follow, cancel. Thin shells over workers.api.Jobs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Query

from api.deps import JobsDep, Principal, ReadAccess, SettingsDep, WriteAccess, visible
from api.routes.search import ERRORS
from api.schemas import CaptionJobCreate, IndexJobCreate, JobCreate, JobList, JobOut, TagJobCreate
from core.media import write_atomically
from core.service import InvalidQuery
from core.settings import Settings
from workers.jobs import JobNotFound, JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

VOCABULARIES_DIR = "vocabularies"  # labels given inline, kept content-addressed where the workers read them


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
        return _out(jobs.submit_index([Path(path) for path in body.paths], collection, urls=body.urls))
    if isinstance(body, TagJobCreate):
        if body.labels is not None and body.labels_file is not None:
            raise InvalidQuery("give labels or labels_file, not both")
        labels = _vocabulary_file(settings, body.labels) if body.labels else None
        labels = Path(body.labels_file) if body.labels_file else labels
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
def get_job(job_id: str, principal: ReadAccess, jobs: JobsDep) -> JobOut:
    return _out(_owned(principal, jobs.get(job_id)))


@router.delete("/{job_id}", summary="Cancel a job (its remaining chunks end without work)")
def cancel_job(job_id: str, principal: WriteAccess, jobs: JobsDep) -> JobOut:
    _owned(principal, jobs.get(job_id))
    return _out(jobs.cancel(job_id))
