"""The `vlsearch` command: index, search, similar, dupes, info, delete, migrate (and, from other modules, more)."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cli.render import hit_rows, print_hits, print_table
from core.container import Container, StoreKind
from core.settings import Settings
from indexer.decode import load_image
from indexer.errors import VlsearchError
from indexer.pipeline import detach_path, index_images
from indexer.sources import IMAGE_EXTENSIONS, iter_sources
from retriever.dupes import near_duplicate_groups
from retriever.errors import InvalidQuery
from retriever.query import Query, SearchMode, add_captions, search
from retriever.store import Filter, Hit, VectorStore, copy_points

app = typer.Typer(
    name="vlsearch",
    help="Image search: index folders, search by text or image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

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
    """Print a user error on one line and exit 1, instead of a stack trace."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VlsearchError as error:
            err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def container_for(model: str | None = None, pretrained: str | None = None, **overrides: Any) -> Container:
    """Settings from the environment, with the command line's choices on top."""
    update = {key: value for key, value in overrides.items() if value is not None}
    if model is not None:
        update["clip_model"] = model
        update["clip_pretrained"] = pretrained
    elif pretrained is not None:
        update["clip_pretrained"] = pretrained
    return Container(Settings().model_copy(update=update))


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
    container = container_for(model, pretrained, index_type=index_type)
    settings = container.settings
    missing = [str(p) for p in paths if not p.exists() and not p.is_symlink()]
    if missing:
        raise VlsearchError(f"no such file or folder: {', '.join(missing)}")
    files = list(iter_sources(paths))
    encoder = container.encoder()
    store = container.create_or_open_store(collection, encoder)
    with Progress(
        TextColumn("indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        disable=as_json or not err.is_terminal,
    ) as progress:
        task = progress.add_task("index", total=len(files), rate="")

        def advance() -> None:
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} img/s" if speed else "")

        report = index_images(
            files,
            encoder,
            store,
            batch_size=batch_size or settings.batch_size,
            workers=workers or settings.decode_workers,
            limits=container.decode_limits,
            on_file=advance,
        )
    total = store.count()
    store.close()
    if as_json:
        emit_json({**report.to_dict(), "collection": store.name, "count": total})
        return
    rate = report.files / report.seconds if report.seconds else 0.0
    print(
        f"{report.files} files in {report.seconds:.1f}s ({rate:.1f}/s): {report.added} added, "
        f"{report.duplicates} duplicates, {report.unchanged} unchanged, {report.removed} removed, "
        f"{len(report.failed)} failed; collection {store.name!r} holds {total} images"
    )
    for failure in report.failed:
        print(f"  failed: {failure.path}: {failure.error}: {failure.reason}")


def make_filter(
    path_prefix: str | None, tags: list[str] | None, all_tags: list[str] | None, bounds: dict[str, int | None]
) -> Filter | None:
    flt = Filter(path_prefix=path_prefix, tags_any=tuple(tags or ()), tags_all=tuple(all_tags or ()), **bounds)
    return None if flt.is_empty() else flt


def _run_query(container: Container, collection: str | None, query: Query, as_json: bool) -> None:
    store = container.open_store(collection)
    encoder = container.encoder_for(store)
    vlm = container.vlm() if query.rerank or query.captions else None
    hits = search(
        store,
        encoder,
        query,
        max_k=container.settings.max_k,
        scorer=vlm,
        captioner=vlm,
        load_hit_image=container.hit_image_loader(vlm),
    )
    store.close()
    if as_json:
        emit_json(hit_rows(hits))
    else:
        print_hits(hits)


def _image_or_id(value: str, container: Container) -> dict[str, Any]:
    """An existing file is decoded as the query image; anything else is taken as a stored image id."""
    path = Path(value)
    if path.exists():
        return {"image": load_image(path, container.decode_limits).image}
    if "/" in value or path.suffix.lower() in IMAGE_EXTENSIONS:
        raise VlsearchError(f"no such image file: {value}")
    return {"image_id": value}


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
    container = container_for(model, pretrained, vlm_model=vlm)
    settings = container.settings
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
        filter=make_filter(path_prefix, tag, all_tags, bounds),
        rerank=rerank,
        rerank_k=rerank_k if rerank_k is not None else settings.rerank_k,
        fusion_weight=fusion_weight if fusion_weight is not None else settings.fusion_weight,
        captions=captions,
        mode=mode,
        **(_image_or_id(image, container) if image else {}),
    )
    _run_query(container, collection, query, as_json)


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
    container = container_for(model, pretrained)
    query = Query(
        k=k,
        offset=offset,
        min_score=min_score,
        filter=make_filter(path_prefix, tag, None, {}),
        **_image_or_id(image, container),
    )
    _run_query(container, collection, query, as_json)


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
    container = container_for(model, pretrained)
    store = container.open_store(collection)
    groups = near_duplicate_groups(store, threshold if threshold is not None else container.settings.dupes_threshold)
    store.close()
    rows = [[{"id": r.id, "paths": r.payload.get("paths", [])} for r in group] for group in groups]
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
    container = container_for(model, pretrained)
    name = collection or container.settings.collection
    if collection is None and name not in container.list_collections():
        data: dict[str, Any] = {
            "data_dir": str(container.settings.data_dir),
            "collections": container.list_collections(),
        }
    else:
        store = container.open_store(name)
        data = {"collection": store.name, "count": store.count(), "manifest": json.loads(store.manifest.to_json())}
        store.close()
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
    container = container_for(model, pretrained)
    name = collection or container.settings.collection
    if drop:
        container.drop_collection(name)
        result: dict[str, Any] = {"collection": name, "dropped": True}
    else:
        if not targets:
            raise InvalidQuery("give image ids or paths to delete, or --drop for the whole collection")
        store = container.open_store(name)
        removed = _delete_targets(store, targets)
        store.save()
        result = {"collection": name, "deleted": removed, "count": store.count()}
        store.close()
    if as_json:
        emit_json(result)
    else:
        print_table(result)


def _delete_targets(store: VectorStore, targets: list[str]) -> int:
    """Ids are deleted; a path is detached from its image, which goes once no path is left."""
    by_path: dict[str, str] = {}
    wanted = {str(Path(t).resolve()) for t in targets}
    for record in store.scroll():
        for path in record.payload.get("paths", []):
            if path in wanted:
                by_path[path] = record.id
    removed = store.delete([t for t in targets if t not in by_path and store.get([t])])
    for path, image_id in by_path.items():
        removed += int(detach_path(store, image_id, path))
    return removed


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
    if source == target:
        raise VlsearchError(f"--from and --to are both {source}: nothing to migrate")
    container = container_for()
    name = collection or container.settings.collection
    started = time.perf_counter()
    origin = container.open_store(name, kind=source)
    try:
        index_type = "hnsw" if target == "qdrant" and origin.manifest.index_type == "ivfpq" else None
        manifest = replace(origin.manifest, store=target, index_type=index_type or origin.manifest.index_type)
        destination = container.store(name, manifest, target)
        try:
            report = copy_points(origin, destination, batch_size)
        finally:
            destination.close()
    finally:
        origin.close()
    seconds = time.perf_counter() - started
    if as_json:
        emit_json({"collection": name, "from": source, "to": target, **asdict(report), "seconds": round(seconds, 3)})
        return
    print(
        f"migrated collection {name!r} from {source} to {target}: {report.copied} images copied in {seconds:.1f}s, "
        f"counts match ({report.target_count})"
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
    container = container_for(model, pretrained, vlm_model=vlm)
    store = container.open_store(collection)
    generator = container.vlm()
    if ids:
        records = store.get(ids)
        unknown = sorted(set(ids) - {record.id for record in records})
        if unknown:
            raise InvalidQuery(f"no image with id {', '.join(unknown)} in collection {store.name!r}")
    else:
        records = list(store.scroll())
    hits = [Hit(id=r.id, score=0.0, payload=r.payload) for r in records]
    if refresh:  # forget this model's captions only; other models' stay cached
        for hit in hits:
            kept = {k: v for k, v in (hit.payload.get("captions") or {}).items() if k != generator.identity}
            hit.payload = {**hit.payload, "captions": kept}
    chunk = max(1, container.settings.vlm_chunk_size) * 4
    for start in range(0, len(hits), chunk):  # saved as it goes: an interrupted run keeps what it captioned
        add_captions(store, hits[start : start + chunk], generator, container.hit_image_loader(generator))
    store.close()
    rows = [{"id": hit.id, "path": hit.path, "caption": hit.payload["captions"][generator.identity]} for hit in hits]
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
    container = container_for(model, pretrained, vlm_model=vlm)
    source = _image_or_id(image, container)
    if "image_id" in source:
        store = container.open_store(collection)
        records = store.get([source["image_id"]])
        store.close()
        if not records:
            raise InvalidQuery(f"{image} is neither an image file nor an image id in collection {store.name!r}")
        picture = container.load_hit_image(Hit(id=records[0].id, score=0.0, payload=records[0].payload))
    else:
        picture = source["image"]
    answer = container.vlm().ask(picture, question)
    if as_json:
        emit_json({"image": image, "question": question, "answer": answer})
    else:
        print(answer)


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
    chosen = container_for(model, pretrained, vlm_model=vlm).settings
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
