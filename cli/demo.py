"""The offline demo (`make demo`): index a generated shapes-world collection with the shipped model and search it."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.container import SHIPPED_CLIP_MODELS, SHIPPED_VLM_MODELS
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


def main(root: Path = DEMO_DIR, scenes: int = 300) -> None:
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


if __name__ == "__main__":
    main()
