"""`vlsearch eval`: retrieval, rerank, caption, question and yes/no quality on held-out shapes-world scenes, with
targets.

R@K is the fraction of queries with at least one relevant scene among the top K (queries with no relevant scene in
the collection are left out). Rerank rescoring takes CLIP's top `rerank_k` candidates and reorders them. Questions,
VQAScore calibration and the relevance cutoff are measured as models.vlm_eval defines them (one definition for
training, this command and the tests).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.container import Container
from indexer.encoder import ClipEncoder
from indexer.pipeline import index_images
from indexer.sources import iter_sources
from models import vlm_eval
from models.shapes_world import (
    Scene,
    caption_is_complete,
    generate_scenes,
    hard_negatives_for,
    queries,
    read_collection,
    relevance_matrix,
    true_captions,
    write_collection,
)
from reranker.model import VisionLanguageModel
from retriever.query import Query, search
from retriever.store import VectorStore

KINDS = ("object", "attribute", "relation")
RECALL_AT = (1, 5, 10)
METHODS = ("vqa", "caption")
TARGETS = {
    "clip_object_r10": 0.95,
    "rerank_relation_r1": 0.80,
    "rerank_relation_gain": 0.20,
    "caption_accuracy": 0.85,
    "questions": 0.85,
    "question_kind": 0.80,
    "vqa_pairwise": 0.85,
    "vqa_relation_gain": 0.20,
    "cutoff_precision": 0.90,
    "cutoff_recall": 0.80,
}
AT_MOST = {"vqa_ece": 0.10}  # targets that a figure must not exceed


@dataclass(frozen=True)
class EvalConfig:
    scenes: int = 1000
    queries: int = 300
    sizes: tuple[int, ...] = (64, 256)
    seed: int = 0
    rerank_k: int = 20
    caption_scenes: int = 200  # scenes captioned and probed with yes/no questions
    methods: tuple[str, ...] = METHODS
    rerank: bool = True
    workdir: Path | None = None  # rendered scenes are kept here between runs (default: a temp dir)


@dataclass
class SizeResult:
    size: int
    recall: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # ranker -> kind -> "R@K" -> value
    caption_accuracy: float | None = None
    yes_no_accuracy: float | None = None  # P(Yes) > 0.5 on true captions and < 0.5 on their hard negatives
    pairwise: dict[str, float] = field(default_factory=dict)  # method -> true caption scored above each hard negative
    questions: dict[str, float] = field(default_factory=dict)  # "questions" overall, "q <kind>" per question kind
    vqa_ece: float | None = None  # expected calibration error of P("Yes"), 10 bins
    cutoff: dict[str, float] = field(default_factory=dict)  # precision / recall of P("Yes") >= 0.5 among candidates
    queries: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def select_queries(scenes: Sequence[Scene], count: int, seed: int) -> dict[str, list[str]]:
    """Every object and attribute query, and seeded relation queries to make up `count`, each with a relevant scene."""
    chosen: dict[str, list[str]] = {}
    for kind in ("object", "attribute"):
        texts = queries(kind)
        relevant = np.asarray(relevance_matrix(texts, scenes).any(axis=1))
        chosen[kind] = [t for i, t in enumerate(texts) if relevant[i]]
    relation = queries("relation")
    relevant = np.asarray(relevance_matrix(relation, scenes).any(axis=1))
    candidates = [t for i, t in enumerate(relation) if relevant[i]]
    wanted = max(0, count - len(chosen["object"]) - len(chosen["attribute"]))
    order = np.random.default_rng(seed).permutation(len(candidates))[:wanted]
    chosen["relation"] = [candidates[i] for i in sorted(order)]
    return chosen


def recall_at(ranked: Sequence[Sequence[int]], relevant: np.ndarray) -> dict[str, float]:
    """R@K over queries: ranked[q] lists scene indices best first; relevant is (queries x scenes) boolean."""
    result = {}
    for k in RECALL_AT:
        hits = [bool(relevant[q, list(r[:k])].any()) for q, r in enumerate(ranked)]
        result[f"R@{k}"] = float(np.mean(hits)) if hits else 0.0
    return result


def _build_collection(container: Container, encoder: ClipEncoder, folder: Path, name: str) -> VectorStore:
    store = container.create_or_open_store(name, encoder)
    index_images(iter_sources([folder]), encoder, store, batch_size=64, workers=container.settings.decode_workers)
    return store


def evaluate_size(
    container: Container, encoder: ClipEncoder, vlm: VisionLanguageModel | None, config: EvalConfig, folder: Path
) -> SizeResult:
    started = time.perf_counter()
    result = SizeResult(size=config.sizes[0])
    pairs = read_collection(folder)
    scenes = [scene for _, scene in pairs]
    index_of = {str(path.resolve()): i for i, (path, _) in enumerate(pairs)}
    store = _build_collection(container, encoder, folder, f"eval-{folder.name}")
    images: dict[int, Image.Image] = {}

    def image(i: int) -> Image.Image:
        if i not in images:
            with Image.open(pairs[i][0]) as opened:
                images[i] = opened.convert("RGB")
        return images[i]

    chosen = select_queries(scenes, config.queries, config.seed)
    depth = max(max(RECALL_AT), config.rerank_k)
    rankers = ["clip", *(f"rerank_{m}" for m in config.methods if vlm is not None and config.rerank)]
    result.recall = {ranker: {} for ranker in rankers}
    for kind in KINDS:
        texts = chosen[kind]
        result.queries[kind] = len(texts)
        relevant = relevance_matrix(texts, scenes)
        clip_ranked = []
        for text in texts:
            hits = search(store, encoder, Query(text=text, k=depth))
            clip_ranked.append([index_of[str(Path(h.path or "").resolve())] for h in hits])
        result.recall["clip"][kind] = recall_at(clip_ranked, relevant)
        for ranker in rankers[1:]:
            assert vlm is not None
            method = ranker.removeprefix("rerank_")
            reranked = []
            for text, ranked in zip(texts, clip_ranked, strict=True):
                top = ranked[: config.rerank_k]
                scores = vlm.score(text, [image(i) for i in top], method=method)
                order = sorted(range(len(top)), key=lambda j: -scores[j])
                reranked.append([top[j] for j in order] + ranked[config.rerank_k :])
            result.recall[ranker][kind] = recall_at(reranked, relevant)
        if kind == "relation" and vlm is not None and config.rerank:
            candidates = np.array([ranked[: config.rerank_k] for ranked in clip_ranked])
            result.cutoff = vlm_eval.cutoff_figures(vlm, image, relevant, candidates, texts)
    if vlm is not None:
        probe = list(range(min(config.caption_scenes, len(scenes))))
        captions = vlm.caption([image(i) for i in probe])
        result.caption_accuracy = float(
            np.mean([caption_is_complete(scenes[i], c) for i, c in zip(probe, captions, strict=True)])
        )
        result.yes_no_accuracy, result.pairwise = _yes_no(vlm, [(scenes[i], image(i)) for i in probe], config.methods)
        probe_scenes = [scenes[i] for i in probe]
        result.questions = vlm_eval.question_accuracy(vlm, probe_scenes, config.sizes[0], seed=config.seed)
        _, probabilities, truths = vlm_eval.vqa_pairs(vlm, probe_scenes, config.sizes[0], seed=config.seed)
        result.vqa_ece = vlm_eval.expected_calibration_error(probabilities, truths)
    store.close()
    result.seconds = time.perf_counter() - started
    return result


def _yes_no(
    vlm: VisionLanguageModel, probes: list[tuple[Scene, Image.Image]], methods: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Yes/no accuracy on true relation captions and their hard negatives; per method, how often truth scores higher."""
    correct: list[bool] = []
    wins: dict[str, list[bool]] = {m: [] for m in methods}
    for scene, picture in probes:
        relations = [c for c in true_captions(scene, ("relation",))]
        if not relations:
            continue
        truth = relations[0]
        negatives = hard_negatives_for(scene, truth)
        if not negatives:
            continue
        texts = [truth, *negatives]
        for method in methods:
            scores = vlm.score_texts(picture, texts, method=method)
            wins[method] += [scores[0] > s for s in scores[1:]]
            if method == "vqa":
                correct += [scores[0] > 0.5, *[s < 0.5 for s in scores[1:]]]
    accuracy = float(np.mean(correct)) if correct else float("nan")
    return accuracy, {m: float(np.mean(w)) if w else float("nan") for m, w in wins.items()}


def run_evaluation(container: Container, config: EvalConfig) -> dict[str, Any]:
    """Render (or reuse) the held-out scenes, index them, and measure every figure at each canvas size."""
    started = time.perf_counter()
    encoder = container.encoder()
    vlm = container.vlm() if config.rerank else None
    with tempfile.TemporaryDirectory() as scratch:
        workdir = config.workdir or Path(scratch)
        scenes = generate_scenes("test", config.scenes, seed=config.seed)
        results = []
        for size in config.sizes:
            folder = workdir / f"shapes-test-{config.seed}-{config.scenes}-{size}px"
            if not (folder / "scenes.jsonl").exists():
                write_collection(scenes, folder, size=size)
            sized = EvalConfig(**{**config.__dict__, "sizes": (size,)})
            results.append(evaluate_size(container, encoder, vlm, sized, folder))
    default_method = vlm.score_method if vlm is not None else None
    report: dict[str, Any] = {
        "clip_model": encoder.name,
        "vlm_model": vlm.source if vlm is not None else None,
        "default_method": default_method,
        "scenes": config.scenes,
        "rerank_k": config.rerank_k,
        "sizes": [r.__dict__ for r in results],
        "targets": check_targets(results, default_method),
        "seconds": time.perf_counter() - started,
    }
    return report


def check_targets(results: Sequence[SizeResult], default_method: str | None) -> list[dict[str, Any]]:
    """Each target at each size: the figure, the threshold, and whether it holds."""
    rows = []
    for r in results:
        clip = r.recall["clip"]
        rows.append(_target(r.size, "CLIP object R@10", clip["object"]["R@10"], TARGETS["clip_object_r10"]))
        ranker = f"rerank_{default_method}"
        if default_method is not None and ranker in r.recall:
            rerank_r1 = r.recall[ranker]["relation"]["R@1"]
            rows.append(
                _target(r.size, f"rerank ({default_method}) relation R@1", rerank_r1, TARGETS["rerank_relation_r1"])
            )
            gain = rerank_r1 - clip["relation"]["R@1"]
            rows.append(_target(r.size, "rerank relation R@1 gain over CLIP", gain, TARGETS["rerank_relation_gain"]))
        if "rerank_vqa" in r.recall:
            gain = r.recall["rerank_vqa"]["relation"]["R@1"] - clip["relation"]["R@1"]
            rows.append(_target(r.size, "vqa rerank relation R@1 gain", gain, TARGETS["vqa_relation_gain"]))
        if r.caption_accuracy is not None:
            rows.append(_target(r.size, "captions fully correct", r.caption_accuracy, TARGETS["caption_accuracy"]))
        if "vqa" in r.pairwise:
            rows.append(
                _target(r.size, "vqa true caption over each hard swap", r.pairwise["vqa"], TARGETS["vqa_pairwise"])
            )
        if r.vqa_ece is not None:
            rows.append(
                _target(r.size, "P(Yes) expected calibration error", r.vqa_ece, AT_MOST["vqa_ece"], at_most=True)
            )
        if r.questions:
            rows.append(_target(r.size, "questions answered exactly", r.questions["questions"], TARGETS["questions"]))
            for name, value in r.questions.items():
                if name != "questions":
                    rows.append(
                        _target(r.size, f"questions: {name.removeprefix('q ')}", value, TARGETS["question_kind"])
                    )
        for name, value in r.cutoff.items():
            rows.append(_target(r.size, f"{name} (P(Yes) >= 0.5)", value, TARGETS[name.replace(" ", "_")]))
    return rows


def _target(size: int, name: str, value: float, threshold: float, at_most: bool = False) -> dict[str, Any]:
    met = value <= threshold if at_most else value >= threshold
    return {
        "size": size,
        "target": name,
        "value": round(value, 4),
        "threshold": threshold,
        "met": met,
        "at_most": at_most,
    }


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as plain-text tables."""
    lines = [
        f"vlsearch eval: {report['scenes']} held-out test scenes; CLIP {report['clip_model']}; "
        f"VLM {report['vlm_model']} (default method: {report['default_method']}); rerank top {report['rerank_k']}",
    ]
    for sized in report["sizes"]:
        lines.append(f"\n{sized['size']} px  ({', '.join(f'{k} {n}' for k, n in sized['queries'].items())} queries)")
        lines.append(f"  {'ranker':<16}{'kind':<11}{'R@1':>7}{'R@5':>7}{'R@10':>7}")
        for ranker, kinds in sized["recall"].items():
            for kind, values in kinds.items():
                lines.append(f"  {ranker:<16}{kind:<11}" + "".join(f"{values[f'R@{k}']:>7.3f}" for k in RECALL_AT))
        if sized["caption_accuracy"] is not None:
            lines.append(f"  captions fully correct: {sized['caption_accuracy']:.3f}")
            lines.append(f"  yes/no accuracy on true captions and hard negatives: {sized['yes_no_accuracy']:.3f}")
            for method, value in sized["pairwise"].items():
                lines.append(f"  true caption above each hard negative ({method}): {value:.3f}")
            if sized["questions"]:
                lines.append(
                    "  questions answered exactly: "
                    + ", ".join(f"{name.removeprefix('q ')} {value:.3f}" for name, value in sized["questions"].items())
                )
            if sized["vqa_ece"] is not None:
                lines.append(f"  P(Yes) expected calibration error (10 bins): {sized['vqa_ece']:.3f}")
        if sized["cutoff"]:
            lines.append(
                "  relevance cutoff P(Yes) >= 0.5 among relation candidates: "
                + ", ".join(f"{name.removeprefix('cutoff ')} {value:.3f}" for name, value in sized["cutoff"].items())
            )
        lines.append(f"  time: {sized['seconds']:.1f}s")
    lines.append("\ntargets")
    for row in report["targets"]:
        mark = "met" if row["met"] else "MISSED"
        lines.append(
            f"  {row['size']:>4} px  {row['target']:<40} {row['value']:>7.3f}  "
            f"({'<=' if row['at_most'] else '>='} {row['threshold']})  {mark}"
        )
    lines.append(f"\nwall time: {report['seconds']:.1f}s")
    return "\n".join(lines)
