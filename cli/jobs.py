"""The job commands of `vlsearch`: worker, submit, jobs, job. Thin shells over workers.api and the Celery app."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cli.main import CollectionOpt, JsonOpt, app, emit_json, err, reports_errors
from cli.render import printable
from core.container import build_settings
from indexer.errors import InvalidQuery
from indexer.sources import read_listing, read_path_list
from workers.jobs import JobRecord

if TYPE_CHECKING:
    from workers.api import Jobs

submit = typer.Typer(help="Submit a job to the workers; prints its id.", no_args_is_help=True)
app.add_typer(submit, name="submit")


def _jobs() -> Jobs:
    from workers.api import Jobs  # imported when used: Celery would add to every other command's start-up

    return Jobs(build_settings())


@app.command()
@reports_errors
def worker(
    queues: Annotated[str, typer.Option(help="Queues to take tasks from: embed, vlm or both.")] = "embed,vlm",
    concurrency: Annotated[int | None, typer.Option(help="Pool processes (default: cores).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    include: Annotated[
        str | None, typer.Option("--include", "-I", help="More modules to import in the worker (Celery's -I).")
    ] = None,
) -> None:
    """Run a Celery worker (the same as `celery -A workers.app worker`)."""
    from workers.app import QUEUES
    from workers.app import app as celery_app

    unknown = [queue for queue in queues.split(",") if queue not in QUEUES]
    if unknown:
        raise typer.BadParameter(f"unknown queue {', '.join(unknown)}: use {', '.join(QUEUES)}")
    arguments = ["worker", f"--queues={queues}", f"--loglevel={loglevel}", "--events"]
    if concurrency is not None:
        arguments.append(f"--concurrency={concurrency}")
    if include:
        arguments.append(f"--include={include}")
    celery_app.worker_main(arguments)


@submit.command(name="index")
@reports_errors
def submit_index(
    paths: Annotated[list[Path] | None, typer.Argument(help="Folders (recursive) and image files.")] = None,
    urls: Annotated[
        Path | None, typer.Option("--urls", help="A file listing image URLs, one per line (fetched safely).")
    ] = None,
    path_list: Annotated[
        Path | None,
        typer.Option("--paths", help="A file listing image paths, one per line (relative to the file's folder)."),
    ] = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index folders and files, or the images a listing names, on the workers, in chunks of VLSEARCH_CHUNK_SIZE."""
    if sum(map(bool, (paths, urls, path_list))) != 1:
        raise InvalidQuery("give folders and files, or --urls FILE, or --paths FILE: one of them")
    listing = urls or path_list
    if listing is not None and not read_listing(listing):
        raise InvalidQuery(f"the listing {listing} names nothing to index")
    if urls is not None:
        job = _jobs().submit_index(collection=collection, urls=read_listing(urls), source=str(urls))
    elif path_list is not None:
        job = _jobs().submit_index(read_path_list(path_list), collection, source=str(path_list))
    else:
        job = _jobs().submit_index(paths or [], collection)
    if as_json:
        emit_json({"id": job.id, **job.to_dict()})
    else:
        print(job.id)


@submit.command(name="tag")
@reports_errors
def submit_tag(
    labels: Annotated[
        Path | None, typer.Option(help="Label vocabulary: one label per line, or JSON with prompt/threshold.")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Tag probability at or above which a tag is kept.")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Keep only the tags the generative model confirms (queue vlm).")
    ] = False,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot tags for the whole collection from its stored vectors (no image decoded again); --verify rechecks
    each image's best candidates with the generative model."""
    job = _jobs().submit_tag(collection, labels, threshold, verify)
    emit_json({"id": job.id, **job.to_dict()}) if as_json else print(job.id)


@submit.command(name="caption")
@reports_errors
def submit_caption(
    force: Annotated[bool, typer.Option("--force", help="Caption every image, also those with a caption.")] = False,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Captions from the generative model for the images lacking one (queue vlm)."""
    job = _jobs().submit_caption(collection, force)
    emit_json({"id": job.id, **job.to_dict()}) if as_json else print(job.id)


@app.command(name="export-tags")
@reports_errors
def export_tags_command(
    format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    collection: CollectionOpt = None,
) -> None:
    """Every image's id, paths and tags with scores."""
    from core.service import Service

    with Service(build_settings()) as service:
        if output is None:
            service.export_tags(sys.stdout, format, collection)
        else:
            with output.open("w", encoding="utf-8", newline="") as file:
                service.export_tags(file, format, collection)


def _row(job: JobRecord) -> str:
    rate = f"{job.rate:.1f}/s" if job.rate else "-"
    return f"{job.id}  {job.kind:<7} {job.collection:<16} {job.state:<9} {job.done}/{job.total}  {job.failed}  {rate}"


@app.command(name="jobs")
@reports_errors
def jobs_command(as_json: JsonOpt = False) -> None:
    """Jobs, newest first: id, kind, collection, state, done/total, failed, rate."""
    records = _jobs().list()
    if as_json:
        emit_json([record.to_dict() for record in records])
        return
    print(f"{'id':<32}  {'kind':<7} {'collection':<16} {'state':<9} done/total  failed  rate")
    for record in records:
        print(_row(record))


@app.command(name="job")
@reports_errors
def job_command(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the job.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A job's progress: a live bar until it ends (once with --json); --cancel stops it."""
    jobs = _jobs()
    record = jobs.cancel(job_id) if cancel else jobs.get(job_id)
    if as_json:
        emit_json(record.to_dict())
        return
    if not record.is_final and err.is_terminal:
        with Progress(TextColumn(record.kind), BarColumn(), MofNCompleteColumn(), console=err) as progress:
            task = progress.add_task(record.kind, total=record.total)
            while not record.is_final:
                progress.update(task, completed=record.done)
                time.sleep(0.5)
                record = jobs.get(job_id)
            progress.update(task, completed=record.done)
    print(_row(record))
    for error in record.errors:
        print(f"  failed: {printable(error.source)}: {error.error}: {printable(error.reason)}")
    if record.state == "failed":
        sys.exit(1)
