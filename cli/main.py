"""The `vlsearch` command: index, search, similar, dupes, info, delete, migrate (and, from other modules, more).

A thin shell over core.service: it parses arguments, renders results and turns errors into one line on stderr
and exit status 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cli.render import hit_rows, print_hits, print_table, printable
from core.container import Container, StoreKind, build_settings
from core.service import Filter, HitView, InvalidQuery, Query, SearchMode, Service, SortOrder, VlsearchError

app = typer.Typer(
    name="vlsearch",
    help="Image search: index folders, search by text or image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

# Libraries that log to stderr on their own (retries, offline fallbacks, load reports): quiet unless --verbose.
# open_clip logs on the root logger, whose first message would otherwise install a stderr handler.
NOISY_LOGGERS = ("huggingface_hub", "transformers", "urllib3", "httpx", "httpcore", "filelock", "qdrant_client", "PIL")


def quiet_libraries(verbose: bool) -> Callable[[], None]:
    """Configure logging and warnings for one command; returns what puts the previous configuration back."""
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    caught = warnings.catch_warnings()
    caught.__enter__()
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    else:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        warnings.simplefilter("ignore")
    restore_bars = _progress_bars(verbose)

    def restore() -> None:
        restore_bars()
        caught.__exit__(None, None, None)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)

    return restore


def _progress_bars(enabled: bool) -> Callable[[], None]:
    """Turn the hub's and transformers' progress bars (weights loading) off unless enabled; returns the undo."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging  # imported already, with the reranker

    undo: list[Callable[[], None]] = []
    if not enabled:
        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            undo.append(transformers_logging.enable_progress_bar)
        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)

    def restore() -> None:
        for step in undo:
            step()

    return restore


@app.callback()
def main_options(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the log messages of the libraries used (hub, models).")
    ] = False,
) -> None:
    """Image search: index folders, search by text or image."""
    ctx.call_on_close(quiet_libraries(verbose))


CollectionOpt = Annotated[str | None, typer.Option("--collection", "-c", help="Collection name (VLSEARCH_COLLECTION).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="open_clip model, hf-hub: id, local-dir: or shipped name.")
]
PretrainedOpt = Annotated[
    str | None, typer.Option("--pretrained", help="Pretrained tag, hf-hub: id or checkpoint file.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="How many results.")]
OffsetOpt = Annotated[int, typer.Option("--offset", help="Skip this many results (pagination).")]
MinScoreOpt = Annotated[float | None, typer.Option("--min-score", help="Drop results scoring below this.")]
PathPrefixOpt = Annotated[str | None, typer.Option("--path-prefix", help="Only images with a path under this.")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Only images with any of these tags (repeatable).")]
AllTagsOpt = Annotated[list[str] | None, typer.Option("--all-tags", help="Only images with all of these tags.")]
VlmOpt = Annotated[str | None, typer.Option("--vlm", help="Generative model: hub id, directory or shipped name.")]
SizeOpt = Annotated[int | None, typer.Option(help="Size bound in pixels or bytes.")]

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Print a user error on one line and exit 1, instead of a stack trace (every category: see README)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VlsearchError as error:
            message = " ".join(str(error).split())  # one line, whatever the message holds
            err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings_update(model: str | None = None, pretrained: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The command line's choices, to go on top of the environment's settings."""
    update = {key: value for key, value in overrides.items() if value is not None}
    if model is not None:
        update["clip_model"] = model
        update["clip_pretrained"] = pretrained
    elif pretrained is not None:
        update["clip_pretrained"] = pretrained
    return update


def service_for(model: str | None = None, pretrained: str | None = None, **overrides: Any) -> Service:
    """A service on the environment's settings with the command line's on top (InvalidSetting names a bad one)."""
    return Service(build_settings(**settings_update(model, pretrained, **overrides)))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
@reports_errors
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders (recursive) and image files.")],
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model forward.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding threads.")] = None,
    index_type: Annotated[str | None, typer.Option(help="flat | hnsw | ivfpq (new collections).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Index images: new ones are embedded, known ones skipped, duplicates recorded as extra paths."""
    with (
        service_for(model, pretrained, index_type=index_type, batch_size=batch_size, decode_workers=workers) as service,
        Progress(
            TextColumn("indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            disable=as_json or not err.is_terminal,
        ) as progress,
    ):
        task = progress.add_task("index", total=None, rate="")

        def advance() -> None:
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} img/s" if speed else "")

        result = service.index(
            paths, collection, on_total=lambda total: progress.update(task, total=total), on_file=advance
        )
    report = result.report
    if as_json:
        emit_json(result.to_dict())
        return
    rate = report.files / report.seconds if report.seconds else 0.0
    print(
        f"{report.files} files in {report.seconds:.1f}s ({rate:.1f}/s): {report.added} added, "
        f"{report.duplicates} duplicates, {report.unchanged} unchanged, {report.removed} removed, "
        f"{len(report.failed)} failed; collection {result.collection!r} holds {result.count} images"
    )
    for failure in report.failed:
        print(f"  failed: {printable(failure.path)}: {failure.error}: {printable(failure.reason)}")


def make_filter(
    path_prefix: str | None,
    tags: list[str] | None,
    all_tags: list[str] | None,
    bounds: dict[str, int | None],
    taken_after: str | None = None,
    taken_before: str | None = None,
) -> Filter | None:
    flt = Filter(
        path_prefix=path_prefix, tags_any=tuple(tags or ()), tags_all=tuple(all_tags or ()), **bounds,
        taken_after=taken_after, taken_before=taken_before,
    )  # fmt: skip
    return None if flt.is_empty() else flt


def _print_result(hits: Sequence[HitView], as_json: bool) -> None:
    if as_json:
        emit_json(hit_rows(hits))
    else:
        print_hits(hits)


@app.command(name="search")
@reports_errors
def search_command(
    text: Annotated[str | None, typer.Argument(help="What to look for.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="An image file or stored id to search with.")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Text to steer away from.")] = None,
    text_weight: Annotated[float, typer.Option(help="Weight of the text when combined with an image.")] = 1.0,
    image_weight: Annotated[float, typer.Option(help="Weight of the image when combined with text.")] = 1.0,
    negative_weight: Annotated[float, typer.Option(help="Weight of the negative text.")] = 0.5,
    k: KOpt = 10,
    offset: OffsetOpt = 0,
    min_score: MinScoreOpt = None,
    path_prefix: PathPrefixOpt = None,
    tag: TagOpt = None,
    all_tags: AllTagsOpt = None,
    min_width: SizeOpt = None,
    max_width: SizeOpt = None,
    min_height: SizeOpt = None,
    max_height: SizeOpt = None,
    min_bytes: SizeOpt = None,
    max_bytes: SizeOpt = None,
    taken_after: Annotated[
        str | None, typer.Option("--taken-after", help="Only images taken at or after this ISO date or datetime.")
    ] = None,
    taken_before: Annotated[
        str | None, typer.Option("--taken-before", help="Only images taken at or before this ISO date or datetime.")
    ] = None,
    min_relevance: Annotated[
        float | None,
        typer.Option("--min-relevance", help='Drop results whose P("Yes") is below this (reranks the top rerank-k).'),
    ] = None,
    sort: Annotated[
        SortOrder, typer.Option("--sort", help="relevance: by score; date: what passed the bounds, newest first.")
    ] = "relevance",
    rerank: Annotated[
        bool, typer.Option("--rerank", help="Rescore the top candidates with the generative model.")
    ] = False,
    rerank_k: Annotated[int | None, typer.Option(help="Candidates to rescore (VLSEARCH_RERANK_K).")] = None,
    fusion_weight: Annotated[float | None, typer.Option(help="1: rerank score alone; 0: CLIP alone.")] = None,
    captions: Annotated[bool, typer.Option("--captions", help="Caption the results (cached per model).")] = False,
    mode: Annotated[
        SearchMode,
        typer.Option(
            "--mode", help="clip: by image content; keyword: words of file names, tags, captions; hybrid: both."
        ),
    ] = "clip",
    vlm: VlmOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search a collection by text, an image, or both; optionally reranked and captioned by the generative model."""
    with service_for(model, pretrained, vlm_model=vlm) as service:
        settings = service.settings
        if text is None and image is None:
            raise InvalidQuery("give a query text, --image, or both")
        bounds = dict(
            min_width=min_width,
            max_width=max_width,
            min_height=min_height,
            max_height=max_height,
            min_bytes=min_bytes,
            max_bytes=max_bytes,
        )
        query = Query(
            text=text,
            negative=negative,
            text_weight=text_weight,
            image_weight=image_weight,
            negative_weight=negative_weight,
            k=k,
            offset=offset,
            min_score=min_score,
            filter=make_filter(path_prefix, tag, all_tags, bounds, taken_after, taken_before),
            rerank=rerank,
            rerank_k=rerank_k if rerank_k is not None else settings.rerank_k,
            fusion_weight=fusion_weight if fusion_weight is not None else settings.fusion_weight,
            captions=captions,
            mode=mode,
            min_relevance=min_relevance,
            sort=sort,
            **(service.query_image(image).fields() if image else {}),
        )
        result = service.search(query, collection)
    _print_result(result.hits, as_json)


@app.command()
@reports_errors
def similar(
    image: Annotated[str, typer.Argument(help="An image file, or the id of a stored image.")],
    k: KOpt = 10,
    offset: OffsetOpt = 0,
    min_score: MinScoreOpt = None,
    path_prefix: PathPrefixOpt = None,
    tag: TagOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images that look like this one."""
    with service_for(model, pretrained) as service:
        result = service.similar(
            image, collection, k=k, offset=offset, min_score=min_score, filter=make_filter(path_prefix, tag, None, {})
        )
    _print_result(result.hits, as_json)


@app.command()
@reports_errors
def dupes(
    threshold: Annotated[
        float | None, typer.Option(help="Similarity at or above which images are near-duplicates.")
    ] = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Groups of near-duplicate images (and exact duplicates stored under several paths)."""
    with service_for(model, pretrained) as service:
        groups = service.duplicates(collection, threshold)
    rows = [[{"id": member.id, "paths": member.paths} for member in group.members] for group in groups]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        print("no duplicates")
    for number, group in enumerate(rows, 1):
        print(f"group {number}:")
        for member in group:
            for path in member["paths"]:
                print(f"  {member['id']}  {path}")


@app.command()
@reports_errors
def info(
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A collection's manifest and counts (or the list of collections when none exists by that name)."""
    with service_for(model, pretrained) as service:
        name = collection or service.settings.collection
        if collection is None and name not in service.list_collections():
            data = service.overview().to_dict()
        else:
            data = service.info(name).to_dict()
    if as_json:
        emit_json(data)
    else:
        print_table(data)


@app.command()
@reports_errors
def delete(
    targets: Annotated[
        list[str] | None, typer.Argument(help="Image ids or file paths to remove from the collection.")
    ] = None,
    drop: Annotated[bool, typer.Option("--drop", help="Delete the whole collection.")] = False,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove images (by id or path) from a collection, or drop the collection with --drop."""
    with service_for(model, pretrained) as service:
        if drop:
            result: dict[str, Any] = service.drop(collection).to_dict()
        else:
            result = service.delete(targets or [], collection).to_dict()
    if as_json:
        emit_json(result)
    else:
        print_table(result)


@app.command()
@reports_errors
def migrate(
    source: Annotated[StoreKind, typer.Option("--from", help="The store to copy from.")],
    target: Annotated[StoreKind, typer.Option("--to", help="The store to copy into (created if missing).")],
    collection: CollectionOpt = None,
    batch_size: Annotated[int, typer.Option(help="Points per read and write.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Copy a collection with its vectors, payloads and manifest to the other store, then check the counts.

    Where each store lives comes from the settings (VLSEARCH_DATA_DIR, VLSEARCH_QDRANT_URL or VLSEARCH_QDRANT_PATH).
    Running it again finishes an interrupted copy. An IVF-PQ collection becomes HNSW on Qdrant.
    """
    with service_for() as service:
        result = service.migrate(source, target, collection, batch_size)
    if as_json:
        emit_json(
            {
                "collection": result.collection,
                "from": result.source,
                "to": result.target,
                "copied": result.copied,
                "source_count": result.source_count,
                "target_count": result.target_count,
                "seconds": result.seconds,
            }
        )
        return
    print(
        f"migrated collection {result.collection!r} from {source} to {target}: {result.copied} images copied in "
        f"{result.seconds:.1f}s, counts match ({result.target_count})"
    )


@app.command()
@reports_errors
def caption(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Stored image ids (default: every image without one).")
    ] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Caption again even where a caption is cached.")] = False,
    vlm: VlmOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Caption stored images with the generative model; captions are cached in the payload per model."""
    with service_for(model, pretrained, vlm_model=vlm) as service:
        rows = [row.to_dict() for row in service.caption(ids, collection, refresh=refresh)]
    if as_json:
        emit_json(rows)
    else:
        for row in rows:
            print(f"{row['id']}  {row['path']}  {row['caption']}")


@app.command()
@reports_errors
def ask(
    image: Annotated[str, typer.Argument(help="An image file, or the id of a stored image.")],
    question: Annotated[str, typer.Argument(help="The question about the image.")],
    vlm: VlmOpt = None,
    collection: CollectionOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the generative model a question about one image."""
    with service_for(model, pretrained, vlm_model=vlm) as service:
        answer = service.ask(image, question, collection)
    if as_json:
        emit_json(answer.to_dict())
    else:
        print(answer.answer)


@app.command(name="eval")
@reports_errors
def eval_command(
    scenes: Annotated[int, typer.Option(help="Held-out test scenes in the collection.")] = 1000,
    queries: Annotated[
        int, typer.Option(help="Queries: every object and attribute one, relation ones to this total.")
    ] = 300,
    sizes: Annotated[str, typer.Option(help="Canvas sizes to render at, comma-separated.")] = "64,256",
    seed: Annotated[int, typer.Option(help="Seed of the scenes and the query sample.")] = 0,
    rerank_k: Annotated[int, typer.Option(help="CLIP candidates the generative model rescores.")] = 20,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="CLIP figures only.")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Keep rendered scenes here between runs.")] = None,
    vlm: VlmOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quality on held-out shapes-world scenes: R@K for CLIP and CLIP + rerank, captions, yes/no; with targets."""
    from cli.evaluate import EvalConfig, format_report, run_evaluation  # the shapes world is only needed here

    # The shipped shapes-world models unless the user names others; collections go to a scratch folder.
    chosen = build_settings(**settings_update(model, pretrained, vlm_model=vlm))
    overrides: dict[str, Any] = {}
    if not {"clip_model", "clip_pretrained"} & chosen.model_fields_set:
        overrides.update(clip_model="shapes-clip", clip_pretrained=None, text_templates=["{}"])
    if "vlm_model" not in chosen.model_fields_set:
        overrides["vlm_model"] = "shapes-vlm"
    with tempfile.TemporaryDirectory() as scratch:
        container = Container(chosen.model_copy(update={**overrides, "data_dir": Path(scratch), "store": "faiss"}))
        config = EvalConfig(
            scenes=scenes,
            queries=queries,
            sizes=tuple(int(size) for size in sizes.split(",")),
            seed=seed,
            rerank_k=rerank_k,
            rerank=not no_rerank,
            workdir=workdir,
        )
        report = run_evaluation(container, config)
    if as_json:
        emit_json(report)
    else:
        print(format_report(report))


# The job commands (worker, submit, jobs, job) live in cli/jobs.py and register themselves on `app`.
from cli import chat as _chat_command  # noqa: E402, F401  (chat: a conversation about one image)
from cli import jobs as _job_commands  # noqa: E402, F401
from cli import keys as _key_commands  # noqa: E402, F401  (keys create|list|revoke)
from cli import serve as _serve_command  # noqa: E402, F401  (serve: the HTTP API)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
