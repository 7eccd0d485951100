"""The offline demo (`make demo`): index a generated shapes-world collection with the shipped model, search it, then
serve the HTTP API over it on 127.0.0.1:8000 (`vlsearch serve`'s code path) with a read key made for the demo.

    .venv/bin/python -m cli.demo [--no-serve] [--host 127.0.0.1] [--port 8000] [--root demo-data] [--scenes 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from core.container import SHIPPED_CLIP_MODELS, SHIPPED_VLM_MODELS
from core.keys import KeyStore
from core.service import Query, Service
from core.settings import Settings
from models.shapes_world import caption_is_true, generate_scenes, read_collection, true_captions, write_collection

DEMO_DIR = Path("demo-data")
DEMO_QUERIES = ("a red circle", "a large blue square")


def demo_settings(root: Path) -> tuple[Settings, bool, bool]:
    """The shipped shapes-world models when present; else an untrained tiny model, said plainly."""
    trained = (SHIPPED_CLIP_MODELS["shapes-clip"] / "open_clip_config.json").exists()
    generative = (SHIPPED_VLM_MODELS["shapes-vlm"] / "config.json").exists()
    model = "shapes-clip" if trained else "tiny-vit"
    settings = Settings(
        data_dir=root / "index",
        clip_model=model,
        clip_pretrained=None,
        text_templates=["{}"],
        collection="shapes",
        vlm_model="shapes-vlm",
        vlm_device="cpu",
    )
    return settings, trained, generative


def server_environment(settings: Settings) -> dict[str, str]:
    """The demo's settings as the VLSEARCH_ variables that `vlsearch serve` (and the app it runs) reads."""
    return {
        "VLSEARCH_DATA_DIR": str(settings.data_dir.resolve()),
        "VLSEARCH_COLLECTION": settings.collection,
        "VLSEARCH_CLIP_MODEL": settings.clip_model,
        "VLSEARCH_CLIP_PRETRAINED": settings.clip_pretrained or "none",
        "VLSEARCH_TEXT_TEMPLATES": json.dumps(settings.text_templates),
        "VLSEARCH_VLM_MODEL": settings.vlm_model,
        "VLSEARCH_VLM_DEVICE": settings.vlm_device,
    }


def curl_line(base_url: str, key: str, collection: str, text: str) -> str:
    """A `curl` command that runs one text search against the served API."""
    body = json.dumps({"collection": collection, "text": text, "k": 5})
    headers = ["-H", f"X-API-Key: {key}", "-H", "Content-Type: application/json"]
    return shlex.join(["curl", "-s", f"{base_url}/v1/search", *headers, "-d", body])


def serve_demo(settings: Settings, host: str, port: int) -> None:
    """Serve the API over the demo's collection until interrupted, after printing the URL, a read key and a curl."""
    from cli.serve import serve  # the command's own code path (typer, uvicorn), imported only when serving

    created = KeyStore.from_settings(settings).create("read", name="demo")
    shown_host = f"[{host}]" if ":" in host else host
    base_url = f"http://{shown_host}:{port}"
    print(f"\nserving the page and the API on {base_url}/ (API docs: {base_url}/docs; Ctrl-C stops it)")
    print(f"read key (made for this demo, in {settings.data_dir}; paste it into the page): {created.secret}")
    print("try:")
    print(f"  {curl_line(base_url, created.secret, settings.collection, DEMO_QUERIES[0])}")
    sys.stdout.flush()
    os.environ.update(server_environment(settings))
    try:
        serve(host=host, port=port)
    except typer.Exit as error:  # serve printed its one-line error already
        raise SystemExit(error.exit_code) from None


def run(root: Path = DEMO_DIR, scenes: int = 300) -> Settings:
    """Generate (once) and index the demo collection, and print a few searches; returns the demo's settings."""
    settings, trained, generative = demo_settings(root)
    images = root / "scenes"
    if not images.exists():
        print(f"generating {scenes} shapes-world scenes (test split) in {images}")
        write_collection(generate_scenes("test", scenes, seed=7), images, size=128)
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    with Service(settings) as service:
        encoder = service.container.encoder()
        if not trained:
            print("NOTE: models/shapes-clip is not there, so this demo uses an UNTRAINED tiny model: the pipeline")
            print("      runs, but its rankings are meaningless.")
        indexed = service.index([images], settings.collection, batch_size=64, workers=2)
        report = indexed.report
        print(f"indexed {report.added} images in {report.seconds:.1f}s with {encoder.name} ({encoder.identity[:19]}…)")
        collection = read_collection(images)
        scenes_by_path = {str(path.resolve()): scene for path, scene in collection}
        # A relation query that some scene of this collection makes true.
        relation = next(c for _, scene in collection for c in true_captions(scene, ("relation",)))
        vlm = service.container.vlm() if generative else None
        for text in (*DEMO_QUERIES, relation):
            rankings = [("CLIP", Query(text=text, k=5))]
            if vlm is not None:
                reranked = Query(text=text, k=5, rerank=True, captions=True)
                rankings.append((f"CLIP + rerank ({vlm.score_method})", reranked))
            for label, query in rankings:
                hits = service.search(query, settings.collection).hits
                print(f'\nsearch "{text}"  [{label}]')
                for rank, hit in enumerate(hits, 1):
                    scene = scenes_by_path.get(str(Path(hit.path or "").resolve()))
                    verdict = "match" if scene is not None and caption_is_true(scene, text) else "no match"
                    score = f"{hit.score:.3f}"
                    shown = score if hit.rerank_score is None else f"{score} -> {hit.rerank_score:.3f}"
                    caption = next(iter(hit.captions.values()), "")
                    print(f"  {rank}. {shown:<16} {Path(hit.path or '').name:<10} {verdict:<9} {caption}")
        if vlm is None:
            print("\n(models/shapes-vlm is not there: no reranking or captions in this demo)")
    rerank = " --vlm shapes-vlm --rerank --captions" if vlm is not None else ""
    print(
        f"\ntry it yourself: VLSEARCH_DATA_DIR={settings.data_dir} .venv/bin/vlsearch search 'a purple square' "
        f"--collection {settings.collection}{rerank}"
    )
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="End after the searches.")
    parser.add_argument("--host", default="127.0.0.1", help="Address the API listens on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port the API listens on (default 8000).")
    parser.add_argument("--root", type=Path, default=DEMO_DIR, help="The demo's folder (default demo-data).")
    parser.add_argument("--scenes", type=int, default=300, help="Scenes generated when the folder has none.")
    args = parser.parse_args(argv)
    settings = run(args.root, args.scenes)
    if args.serve:
        serve_demo(settings, args.host, args.port)


if __name__ == "__main__":
    main()
