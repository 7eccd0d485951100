"""How well a generative model answers, scores and cuts in the shapes world: the figures of issue 14's targets.

Used by stage 2's training (models.train_vlm_questions), by `vlsearch eval` and by the tests, so every figure is
measured one way. All of it goes through the production `VisionLanguageModel` (ask, score, score_texts).

- questions: exact-answer accuracy of `ask()` per question kind (models.shapes_world.question_set);
- VQAScore pairwise: P("Yes") of a true relation caption above that of each of its false hard swaps;
- calibration: expected calibration error of P("Yes") over 10 equal-width bins, on balanced true/false
  (query, scene) pairs (half the false ones hard negatives);
- cutoff: over CLIP's top 20 for relation queries, precision and recall of P("Yes") >= 0.5 among them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.shapes_world import (
    QUESTION_KINDS,
    Scene,
    answer_is_correct,
    generate_scenes,
    hard_negatives_for,
    question_set,
    relevance_matrix,
    render,
    true_captions,
)
from models.train_vlm import sample_vqa_pair
from models.train_vlm_questions import sample_near_miss
from reranker.model import VisionLanguageModel
from reranker.scoring import CAPTION, SCORE_METHODS, VQA

RERANK_K = 20
CUTOFF = 0.5


def question_accuracy(
    vlm: VisionLanguageModel, scenes: Sequence[Scene], side: int = 64, seed: int = 0
) -> dict[str, float]:
    """Exact-answer accuracy overall and per kind, each scene rendered at `side` px."""
    asked = question_set(scenes, seed=seed)
    images = {index: render(scenes[index], side) for index in {i for i, _ in asked}}
    right: dict[str, list[bool]] = {kind: [] for kind in QUESTION_KINDS}
    for index, question in asked:
        right[question.kind].append(answer_is_correct(question.answer, vlm.ask(images[index], question.text)))
    result = {"questions": float(np.mean([r for values in right.values() for r in values]))}
    result.update({f"q {kind}": float(np.mean(values)) for kind, values in right.items() if values})
    return result


def vqa_pairs(
    vlm: VisionLanguageModel, scenes: Sequence[Scene], side: int = 64, seed: int = 0
) -> tuple[float, list[float], list[bool]]:
    """Pairwise accuracy of the true relation caption over each hard swap, and balanced (P("Yes"), truth) pairs.

    Per two-object scene: one true relation caption against each of its false hard negatives. For calibration,
    per scene one true caption and one false one: for two objects a hard swap or, as often, a caption one word
    off (what CLIP's candidates for a relation query look like); for one object the training sampler's.
    """
    rng = np.random.default_rng([seed, 31])
    wins: list[bool] = []
    probabilities: list[float] = []
    truths: list[bool] = []
    for scene in scenes:
        image = render(scene, side)
        if len(scene.objects) == 2:
            relations = true_captions(scene, ["relation"])
            caption = relations[int(rng.integers(len(relations)))]
            negatives = hard_negatives_for(scene, caption)
            scores = vlm.score_texts(image, [caption, *negatives], method=VQA)
            wins += [scores[0] > s for s in scores[1:]]
            if negatives and rng.random() < 0.5:  # half the false ones a hard swap, half one word off (near miss)
                probabilities += [scores[0], scores[1 + int(rng.integers(len(negatives)))]]
            else:
                _, near_miss = sample_near_miss(scene, rng)
                probabilities += [scores[0], vlm.score_texts(image, [near_miss], method=VQA)[0]]
            truths += [True, False]
        else:
            positive, negative = sample_vqa_pair(scene, rng)
            probabilities += vlm.score_texts(image, [positive, negative], method=VQA)
            truths += [True, False]
    return float(np.mean(wins)), probabilities, truths


def expected_calibration_error(probabilities: Sequence[float], truths: Sequence[bool], bins: int = 10) -> float:
    """Sum over equal-width bins of |mean P - fraction true|, weighted by the bin's share of the pairs."""
    p = np.asarray(probabilities, dtype=np.float64)
    t = np.asarray(truths, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(p[chosen].mean() - t[chosen].mean())
    return float(error)


def platt_scaling(log_odds: Sequence[float], truths: Sequence[bool]) -> tuple[float, float]:
    """(scale, bias) minimising the log loss of sigmoid(scale * log_odds + bias) against `truths`."""
    import torch

    z, target = torch.tensor(log_odds, dtype=torch.float64), torch.tensor(truths, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([scale, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scale * z + bias, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(scale.detach()), float(bias.detach())


def raw_log_odds(vlm: VisionLanguageModel, probabilities: Sequence[float]) -> np.ndarray:
    """The model's own log-odds behind calibrated P("Yes") values (the checkpoint's calibration undone)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    scale, bias = vlm.loaded.preferences.vqa_calibration or (1.0, 0.0)
    return (np.log(p / (1 - p)) - bias) / scale


def _calibrated(log_odds: np.ndarray, scale: float, bias: float) -> list[float]:
    return (1 / (1 + np.exp(-(scale * log_odds + bias)))).tolist()


def fit_calibration(vlm: VisionLanguageModel, scenes: Sequence[Scene]) -> tuple[float, float, float, float]:
    """Platt scaling of P("Yes")'s log-odds on `scenes` (never test ones): (scale, bias, ECE before, after)."""
    _, probabilities, truths = vqa_pairs(vlm, scenes, seed=1)
    log_odds = raw_log_odds(vlm, probabilities)
    scale, bias = platt_scaling(log_odds.tolist(), truths)
    return (scale, bias, expected_calibration_error(probabilities, truths),
            expected_calibration_error(_calibrated(log_odds, scale, bias), truths))


def fit_retrieval_calibration(
    vlm: VisionLanguageModel, scenes: int = 1000, query_count: int = 100, seed: int = 5, side: int = 64
) -> tuple[float, float, dict[str, float]]:
    """Platt scaling of P("Yes")'s raw log-odds on what `min_relevance` cuts: CLIP's top 20 for relation queries
    over a VALIDATION collection. Returns (scale, bias, figures before and after on those pairs).

    The pairs of `fit_calibration` (a true caption against a swap or a near miss, half and half) are easier than
    CLIP's candidates, most of which are one word off; fitted on those, P("Yes") >= 0.5 kept too many of them.
    """
    from models.train_clip import embed_images, embed_texts
    from models.train_vlm import load_clip, relation_queries_with_a_match

    collection = generate_scenes("validation", scenes, seed=seed)
    query_texts = relation_queries_with_a_match(collection, query_count, np.random.default_rng(seed))
    model, preprocess, tokenizer = load_clip()
    images = [render(s, side) for s in collection]
    relevant = relevance_matrix(query_texts, collection)
    clip_scores = embed_texts(model, tokenizer, query_texts) @ embed_images(model, preprocess, images).T
    top = np.argsort(-clip_scores, axis=1, kind="stable")[:, :RERANK_K]
    probabilities: list[float] = []
    truths: list[bool] = []
    for q, query in enumerate(query_texts):
        probabilities += vlm.score(query, [images[i] for i in top[q]], method=VQA)
        truths += [bool(relevant[q, i]) for i in top[q]]
    current = vlm.loaded.preferences.vqa_calibration or (1.0, 0.0)
    raw = raw_log_odds(vlm, probabilities)
    a, b = platt_scaling(raw.tolist(), truths)
    t = np.asarray(truths)
    figures: dict[str, float] = {}
    for name, (s, c) in {"before": current, "after": (a, b)}.items():
        calibrated = np.asarray(_calibrated(raw, s, c))
        kept = calibrated >= CUTOFF
        figures[f"{name} precision"] = float((t & kept).sum() / max(1, kept.sum()))
        figures[f"{name} recall"] = float((t & kept).sum() / max(1, t.sum()))
        figures[f"{name} ECE"] = expected_calibration_error(calibrated.tolist(), truths)
    return a, b, figures


def quick(vlm: VisionLanguageModel, scenes: Sequence[Scene]) -> dict[str, float]:
    """The figures logged while training (64 px): question accuracy by kind, VQAScore pairwise accuracy, ECE."""
    result = question_accuracy(vlm, scenes)
    pairwise, probabilities, truths = vqa_pairs(vlm, scenes)
    result["vqa pairwise"] = pairwise
    result["vqa ECE"] = expected_calibration_error(probabilities, truths)
    return {k: round(v, 3) for k, v in result.items()}


def cutoff_figures(
    vlm: VisionLanguageModel,
    image_of: Callable[[int], Any],
    relevant: np.ndarray,
    top: np.ndarray,
    query_texts: Sequence[str],
    threshold: float = CUTOFF,
) -> dict[str, float]:
    """Precision and recall of P("Yes") >= threshold among each query's reranked candidates (pooled);
    `image_of(i)` is scene i's image, `top[q]` the candidates of query q."""
    kept = hit = wanted = 0
    for q, query in enumerate(query_texts):
        scores = vlm.score(query, [image_of(int(i)) for i in top[q]], method=VQA)
        for i, score in zip(top[q], scores, strict=True):
            keep, good = score >= threshold, bool(relevant[q, i])
            kept += keep
            wanted += good
            hit += keep and good
    return {"cutoff precision": hit / kept if kept else math.nan, "cutoff recall": hit / wanted if wanted else 1.0}


def report(
    vlm: VisionLanguageModel,
    log: Callable[[str], None],
    seed: int = 0,
    test_scenes: int = 400,
    collection_scenes: int = 1000,
    test_queries: int = 200,
    question_scenes: int = 400,
) -> dict[str, Any]:
    """Every figure on the test split at 64 and 256 px, logged as it is measured."""
    from models.train_clip import embed_images, embed_texts, recall_at_k
    from models.train_vlm import caption_accuracy, hard_negative_accuracy, load_clip, relation_queries_with_a_match

    rng = np.random.default_rng(seed)
    test = generate_scenes("test", test_scenes, seed=seed)
    asked = generate_scenes("test", question_scenes, seed=seed + 2)
    collection = generate_scenes("test", collection_scenes, seed=seed + 1)
    query_texts = relation_queries_with_a_match(collection, test_queries, rng)
    model, preprocess, tokenizer = load_clip()
    log(
        f"test split (seed {seed}): {len(test)} scenes for captions, hard negatives and calibration; "
        f"{len(asked)} scenes (seed {seed + 2}) for questions; rerank over {len(collection)} scenes "
        f"(seed {seed + 1}) with {len(query_texts)} relation queries that have a match, CLIP top {RERANK_K}"
    )
    out: dict[str, Any] = {}
    for side in (64, 256):
        figures: dict[str, float] = {"caption": caption_accuracy(vlm, test, side)}
        figures["caption (two objects)"] = caption_accuracy(vlm, [s for s in test if len(s.objects) == 2], side)
        figures["hard-neg caption"] = hard_negative_accuracy(vlm, test, side, CAPTION, np.random.default_rng(0))
        figures.update(question_accuracy(vlm, asked, side))
        pairwise, probabilities, truths = vqa_pairs(vlm, test, side)
        figures["vqa pairwise"] = pairwise
        figures["vqa ECE"] = expected_calibration_error(probabilities, truths)
        images = [render(s, side) for s in collection]
        relevant = relevance_matrix(query_texts, collection)
        clip_scores = embed_texts(model, tokenizer, query_texts) @ embed_images(model, preprocess, images).T
        recall = recall_at_k(clip_scores, relevant, ks=(1, RERANK_K))
        figures["clip R@1"], figures[f"clip R@{RERANK_K}"] = recall[1], recall[RERANK_K]
        top = np.argsort(-clip_scores, axis=1, kind="stable")[:, :RERANK_K]
        for method in SCORE_METHODS:
            hits = []
            for q, query in enumerate(query_texts):
                scores = vlm.score(query, [images[i] for i in top[q]], method=method)
                hits.append(bool(relevant[q, top[q][int(np.argmax(scores))]]))
            figures[f"rerank {method} R@1"] = float(np.mean(hits))
        figures.update(cutoff_figures(vlm, images.__getitem__, relevant, top, query_texts))
        out[str(side)] = figures
        log(f"{side} px: " + json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return out


def default_method(figures: dict[str, Any]) -> str:
    """vqa (the production default for the released chat models) unless caption reranks clearly better."""
    worst = {m: min(f[f"rerank {m} R@1"] for f in figures.values()) for m in SCORE_METHODS}
    return CAPTION if worst[CAPTION] > worst[VQA] + 0.02 else VQA


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m models.vlm_eval [CHECKPOINT]`: the full report of a checkpoint, appended to its training log."""
    import argparse
    from pathlib import Path

    from models import MODELS_DIR

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", type=Path, nargs="?", default=MODELS_DIR / "shapes-vlm")
    parser.add_argument("--calibrate", action="store_true",
                        help="first refit vqa_calibration on validation retrieval candidates (into vlsearch.json)")
    parser.add_argument("--no-log", action="store_true", help="print the report only; leave training_log.txt as it is")
    args = parser.parse_args(argv)
    vlm = VisionLanguageModel(str(args.checkpoint), device="cpu", dtype="float32", max_new_tokens=16)
    vlm.load()
    with open(os.devnull if args.no_log else args.checkpoint / "training_log.txt", "a", encoding="utf-8") as log_file:

        def log(line: str) -> None:
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        if args.calibrate:
            scale, bias, fitted = fit_retrieval_calibration(vlm)
            preferences_file = args.checkpoint / "vlsearch.json"
            preferences = json.loads(preferences_file.read_text(encoding="utf-8"))
            preferences["vqa_calibration"] = [round(scale, 4), round(bias, 4)]
            preferences_file.write_text(json.dumps(preferences, indent=2) + "\n", encoding="utf-8")
            log(f"P(Yes) calibration refit on validation CLIP top-20 candidates of relation queries: raw log-odds x "
                f"{scale:.4f} + {bias:.4f}; " + json.dumps({k: round(v, 3) for k, v in fitted.items()}))
            vlm = VisionLanguageModel(str(args.checkpoint), device="cpu", dtype="float32", max_new_tokens=16)
            vlm.load()
        figures = report(vlm, log)
        log(f"default score method by these figures: {default_method(figures)} (vlsearch.json: {vlm.score_method})")


if __name__ == "__main__":
    main()
