"""Indexing throughput on 12 MP photo-like JPEGs, measured side by side in one run.

    .venv/bin/python bench/indexing.py [--images 300] [--rounds 3] [--model ViT-B-32]

Prints (a) the model forward alone on pre-made tensors, (d) decode + preprocess per image on one core with and
without JPEG draft mode, (b) the full pipeline (decode threads overlapping the forward) and the physical bound of
this machine: cores / (model core-seconds per image + decode core-seconds per image), in interleaved rounds
(a, d, b, a, d, b, ...) with the median ratio and its spread. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.decode import DecodeLimits, load_image
from indexer.encoder import ClipEncoder, EncoderSpec
from indexer.pipeline import index_images
from retriever.faiss_store import FaissStore
from retriever.store import Manifest

CACHE = Path(__file__).resolve().parent.parent / "bench-data" / "photos-12mp"


def make_photos(count: int, folder: Path = CACHE) -> list[Path]:
    """Photo-like 4000×3000 JPEGs (smooth content plus mild noise, 2–4 MB each), generated once and cached."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo{index:04d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(index)
            small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
                (4000, 3000), Image.Resampling.BICUBIC
            )
            pixels = np.asarray(small, dtype=np.int16) + rng.integers(-6, 7, (3000, 4000, 3), dtype=np.int16)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(path)
    return paths


def forward_rate(encoder: ClipEncoder, batch_size: int, batches: int) -> float:
    """(a) images/s of the model forward alone, on tensors made beforehand."""
    pixels = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size)
    encoder.encode_images(pixels)  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        encoder.encode_images(pixels)
    return batch_size * batches / (time.perf_counter() - started)


def decode_seconds(encoder: ClipEncoder, paths: list[Path], draft: bool) -> float:
    """(d) median seconds to decode and preprocess one photo on one core."""
    limits = DecodeLimits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for path in paths:
            started = time.perf_counter()
            image = load_image(path, limits, draft_size=encoder.image_size if draft else None).image
            encoder.preprocess(image)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def pipeline_rate(encoder: ClipEncoder, paths: list[Path], batch_size: int, workers: int) -> float:
    """(b) images/s of the whole pipeline into a FAISS store."""
    with tempfile.TemporaryDirectory() as directory:
        manifest = Manifest(encoder=encoder.name, weights=encoder.identity, dim=encoder.dim)
        store = FaissStore.open(Path(directory) / "bench", manifest)
        report = index_images(paths, encoder, store, batch_size=batch_size, workers=workers)
        store.close()
    assert report.added == len(paths) and not report.failed, report.failed[:3]
    return report.added / report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    print(
        f"machine: {cores} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    paths = make_photos(args.images)
    sizes = [p.stat().st_size / 1e6 for p in paths]
    print(f"corpus: {len(paths)} JPEGs 4000x3000, {min(sizes):.1f}-{max(sizes):.1f} MB each")
    encoder = ClipEncoder(EncoderSpec(args.model), device="cpu")
    encoder.load()

    # (a), (d) and (b) one after another, round after round: each round's bound is measured at the machine speed
    # its pipeline run saw, so a ratio does not compare a quiet minute with a busy one.
    sample = paths[:12]
    ratios, rounds = [], []
    for number in range(args.rounds):
        a = forward_rate(encoder, args.batch_size, batches=4)
        d_full = decode_seconds(encoder, sample, draft=False)
        d_draft = decode_seconds(encoder, sample, draft=True)
        b = pipeline_rate(encoder, paths, args.batch_size, args.workers)
        model_core_seconds = torch.get_num_threads() / a
        bound = cores / (model_core_seconds + d_draft)
        ratios.append(b / bound)
        rounds.append((a, d_full, d_draft, b, bound))
        print(
            f"round {number + 1}: (a) {a:.2f} img/s ({model_core_seconds * 1000:.0f} core-ms/img), (d) full "
            f"{d_full * 1000:.0f} / draft {d_draft * 1000:.0f} ms/img, (b) {b:.2f} img/s, bound {bound:.2f}, "
            f"b/bound {b / bound:.2f}"
        )
    a, d_full, d_draft, b, bound = (statistics.median(values) for values in zip(*rounds, strict=True))
    model_core_seconds = torch.get_num_threads() / a
    print(f"medians over {args.rounds} interleaved rounds:")
    print(
        f"(a) model forward alone, batch {args.batch_size}: {a:.2f} img/s ({model_core_seconds * 1000:.0f} core-ms/img)"
    )
    print(
        f"(d) decode+preprocess, 1 core: full {d_full * 1000:.0f} ms/img, draft {d_draft * 1000:.0f} ms/img, "
        f"draft speed-up {d_full / d_draft:.1f}x (target >= 4x)"
    )
    print(f"(b) full pipeline, {args.workers} decode threads: {b:.2f} img/s, b/a = {b / a:.2f}")
    print(
        f"bound = {cores} cores / (model + draft decode core-ms/img) = {bound:.2f} img/s; b/bound median "
        f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 0.9)"
    )


if __name__ == "__main__":
    main()
