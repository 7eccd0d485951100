"""Reranking speed of DeepSeek-VL relevance scores: batched versus one by one, side by side in one run.

    .venv/bin/python bench/rerank.py [--candidates 20] [--method vqa] [--full-size [--full-candidates 2]] [--photos]
                                     [--quantization [--quantization-layers 4]] [--threads N]

A tiny and a small model (random weights, built offline with reranker.tiny, saved, loaded by the production
loader) score the same candidates batched (one call, chunk_size = candidates) and one by one (one call each);
the script prints seconds per candidate, the ratio, the peak memory of each, and that the scores agree.
--full-size repeats it with a 1.3B-shaped model (real dimensions, random weights, built in memory: about 1.9B
parameters, ~8 GB in fp32 on CPU). Random weights: speed and memory only, never quality.
--photos: what search does before scoring, loading the candidates' files (12 MP JPEGs, bench/indexing.py's
corpus), one by one in full against the way search loads them (JPEG draft to the model's `decode_side`, in
parallel), for a model with DeepSeek-VL's 384 px input.
--quantization: fp32 against VLSEARCH_VLM_QUANTIZATION=int8 on the CPU, a 1.3B-shaped model (real dimensions, random
weights) with --quantization-layers of its 24 language and 24 vision layers, saved and loaded by the production
loader: weight bytes (parameters and buffers), the process's resident growth, seconds per candidate, side by side;
figures for all 24 layers scaled from the per-layer ones measured. --threads: torch threads (default: torch's own).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.indexing import make_photos
from core.container import Container
from core.settings import Settings
from reranker.images import decode_side
from reranker.model import VisionLanguageModel
from reranker.quantization import weight_bytes
from reranker.tiny import build_tiny_model, build_tiny_processor, save_tiny_model
from retriever.query import load_images
from retriever.store import Hit

QUERY = "a small red circle left of a large blue square"
WORDS = ["circle square triangle red green blue small large left right of above below a"]

# Two CPU sizes: "tiny" (the test models' size), where the fixed cost of a call dominates, and "small",
# where the matrix products already do; batching saves the former and packs the latter into larger GEMMs.
SIZES: dict[str, tuple[dict[str, Any], int, int]] = {  # name -> (tiny_config sizes, image px, patch px)
    "tiny": ({"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4}, 32, 8),
    "small": (
        {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_layers": 4,
            "num_heads": 4,
            "vision_hidden_size": 128,
            "vision_intermediate_size": 512,
            "vision_layers": 2,
            "vision_heads": 4,
        },
        64,
        8,
    ),
}

# deepseek-vl-1.3b-chat as transformers' conversion script configures it: LLaMA 2048x24, SigLIP-L/16 384 px.
FULL_SIZES: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_layers": 24,
    "num_heads": 16,
    "max_position_embeddings": 16384,
    "vision_hidden_size": 1024,
    "vision_intermediate_size": 4096,
    "vision_layers": 24,
    "vision_heads": 16,
}
FULL_IMAGE, FULL_PATCH, FULL_VOCAB = 384, 16, 102400  # 576 image tokens


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA allocator, else process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - start
            return
        # ru_maxrss cannot be reset between runs, so sample the resident set; return freed heap to the OS
        # first, or memory the previous run freed would hide this run's peak.
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        start = _rss_bytes()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.peak_bytes = max(peak[0], _rss_bytes()) - start


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anonymous_bytes() -> int:
    """The process's resident memory that is not a mapped file (RssAnon)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def make_images(count: int) -> list[Image.Image]:
    """Photo-sized noise images (the processor resizes them, as it would real photos)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(count)]


def timed(run: Callable[[], list[float]], device: torch.device) -> tuple[float, list[float], int]:
    """Seconds, scores and peak extra memory of one run."""
    memory = PeakMemory(device)
    with memory.measure():
        started = time.perf_counter()
        scores = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return seconds, scores, memory.peak_bytes


def compare(vlm: VisionLanguageModel, images: list[Image.Image], method: str, label: str, repeats: int) -> None:
    """Score `images` batched and one by one on the same model and print the figures side by side.

    The two modes alternate `repeats` times and the best time of each is printed (as timeit does): other
    processes on a shared machine only ever add time, and they hit many small calls harder than one big one.
    """
    device = vlm.loaded.input_device
    count = len(images)
    vlm.score(QUERY, images[:1], method=method)  # warm-up: first-call allocations and kernel selection
    runs: dict[str, list[tuple[float, list[float], int]]] = {"batched": [], "one by one": []}
    for _ in range(repeats):
        vlm.chunk_size = count
        runs["batched"].append(timed(lambda: vlm.score(QUERY, images, method=method), device))
        vlm.chunk_size = 1
        runs["one by one"].append(
            timed(lambda: [vlm.score(QUERY, [image], method=method)[0] for image in images], device)
        )
    seconds = {mode: min(run[0] for run in results) for mode, results in runs.items()}
    batched, single = runs["batched"][0][1], runs["one by one"][0][1]
    difference = max(abs(a - b) for a, b in zip(batched, single, strict=True))
    print(f"\n{label}: {count} candidates, method {method}, on {device} ({vlm.loaded.dtype})")
    print(f"  best of {repeats} alternating runs{'s total':>10}{'s/candidate':>14}{'peak MiB':>11}")
    for mode, results in runs.items():
        peak = max(run[2] for run in results) / 2**20
        print(f"  {mode:<31}{seconds[mode]:>8.3f}{seconds[mode] / count:>14.4f}{peak:>11.1f}")
    ratio = seconds["one by one"] / seconds["batched"]
    print(f"  batched is {ratio:.1f}x faster; largest score difference {difference:.2e}")


def compare_loading(count: int) -> None:
    """Seconds to load `count` photo candidates in full one by one, and as search loads them."""
    with tempfile.TemporaryDirectory() as directory:
        container = Container(Settings(data_dir=Path(directory)))
        hits = [Hit(id=path.stem, score=0.0, payload={"paths": [str(path)]}) for path in make_photos(count)]
        side = decode_side(build_tiny_processor(WORDS, image_size=FULL_IMAGE, patch_size=FULL_PATCH).image_processor)
        drafted = partial(container.load_hit_image, draft_size=side)  # what hit_image_loader(vlm) gives search
        modes: dict[str, Callable[[], object]] = {
            "in full, one by one": lambda: [container.load_hit_image(hit) for hit in hits],
            f"draft to >= {side} px, in parallel": lambda: load_images(drafted, hits),
        }
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(2):
            for mode, load in modes.items():
                started = time.perf_counter()
                load()
                runs[mode].append(time.perf_counter() - started)
    print(f"\nloading {count} candidates (4000x3000 JPEG) for a {FULL_IMAGE} px model, best of 2:")
    for mode, seconds in runs.items():
        print(f"  {mode:<31}{min(seconds):>8.3f} s")
    ratio = min(next(iter(runs.values()))) / min(list(runs.values())[1])
    print(f"  search's loading is {ratio:.1f}x faster")


def saved_model(directory: Path, size: str, method: str) -> VisionLanguageModel:
    """A random model of one of SIZES, saved and loaded back through the production loader."""
    sizes, image_size, patch_size = SIZES[size]
    processor = build_tiny_processor(WORDS, image_size=image_size, patch_size=patch_size)
    save_tiny_model(directory, build_tiny_model(processor, seed=0, **sizes), processor)
    vlm = VisionLanguageModel(str(directory), score_method=method)
    vlm.load()
    return vlm


def full_size_model(method: str) -> VisionLanguageModel:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    processor = build_tiny_processor(WORDS, image_size=FULL_IMAGE, patch_size=FULL_PATCH)
    # The word-level tokenizer covers the prompts; the embedding has the released vocabulary size.
    padded_vocab = {"vocab_size": FULL_VOCAB}
    started = time.perf_counter()
    with torch.device(device):
        model: Any = build_tiny_model(processor, seed=0, **FULL_SIZES, **padded_vocab)
    model.to(dtype)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    seconds = time.perf_counter() - started
    print(f"\nbuilt the 1.3B-shaped model in {seconds:.0f} s: {parameters / 1e9:.2f}B parameters")
    return VisionLanguageModel.from_components(model, processor, source="1.3b-shaped", score_method=method)


class LayerClock:
    """Seconds spent inside some modules (the repeated layers), summed over their calls, by forward hooks."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.seconds = 0.0
        self._started = 0.0
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))

    def _start(self, *_: Any) -> None:
        self._started = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def compare_quantization(layers: int, count: int, method: str, repeats: int) -> None:
    """fp32 against int8 on the CPU for a 1.3B-shaped model with `layers` language and vision layers, one run.

    Both load from one saved directory through the production loader. Resident growth is read after a warm-up
    call: fp32 weights stay memory-mapped from the file (resident once read, not anonymous memory); int8 ones, and
    the float32 tensors beside them, are the process's own (the loader releases the file's mapping). Figures for
    the real 24 + 24 layers: the rest of the model plus 24 times one layer's bytes, and the time outside the layers plus
    24 / `layers` times the time inside them (every layer does the same work on the same sequence).
    """
    full_layers = FULL_SIZES["num_layers"]
    sizes = {**FULL_SIZES, "num_layers": layers, "vision_layers": layers}
    processor = build_tiny_processor(WORDS, image_size=FULL_IMAGE, patch_size=FULL_PATCH)
    images = make_images(count)
    rows: dict[str, dict[str, float]] = {}
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        save_tiny_model(Path(directory), build_tiny_model(processor, seed=0, **sizes, vocab_size=FULL_VOCAB), processor)
        for quantization in ("none", "int8"):
            gc.collect()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            before, anon_before = _rss_bytes(), _anonymous_bytes()
            started = time.perf_counter()
            vlm = VisionLanguageModel(
                directory, device="cpu", score_method=method, chunk_size=count, quantization=quantization
            )
            vlm.load()
            load_seconds = time.perf_counter() - started
            vlm.score(QUERY, images[:1])  # warm-up
            gc.collect()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)  # what loading freed (int8: each float32 weight once quantized) goes back
            resident, anonymous = _rss_bytes() - before, _anonymous_bytes() - anon_before
            inner = vlm.model.model
            stacks = (inner.language_model.layers, inner.vision_model.encoder.layers)
            repeated = [layer for stack in stacks for layer in stack]
            per_layer = sum(weight_bytes(stack[0]) for stack in stacks)  # one language and one vision layer
            clock = LayerClock(repeated)
            best = (float("inf"), 0.0)
            for _ in range(repeats):
                clock.seconds = 0.0
                started = time.perf_counter()
                scores[quantization] = vlm.score(QUERY, images)
                best = min(best, (time.perf_counter() - started, clock.seconds))
            clock.remove()
            total, in_layers = best
            weights = weight_bytes(vlm.model)
            rows["fp32" if quantization == "none" else "int8"] = {
                "load s": load_seconds,
                "weights GiB": weights / 2**30,
                "RSS GiB": resident / 2**30,
                "anon RSS GiB": anonymous / 2**30,
                "s/candidate": total / count,
                "24-layer weights GiB": (weights + (full_layers - layers) * per_layer) / 2**30,
                "24-layer s/candidate": (total - in_layers + in_layers * full_layers / layers) / count,
            }
            del vlm, inner, stacks, repeated, clock
    print(
        f"\n1.3B-shaped model with {layers} of {full_layers} language and vision layers (576 image tokens), "
        f"fp32 against int8 on the CPU: {count} candidates, method {method}, {torch.get_num_threads()} threads, "
        f"best of {repeats}"
    )
    columns = list(rows["fp32"])
    widths = {name: len(name) + 2 for name in columns}
    print(f"  {'':<6}" + "".join(f"{name:>{widths[name]}}" for name in columns))
    for label, row in rows.items():
        print(f"  {label:<6}" + "".join(f"{row[name]:>{widths[name]}.3f}" for name in columns))
    compared = [name for name in columns if name not in ("load s", "anon RSS GiB")]
    ratio = {name: rows["fp32"][name] / rows["int8"][name] for name in compared}
    print("  fp32 / int8: " + ", ".join(f"{name} {value:.2f}x" for name, value in ratio.items()))
    difference = max(abs(a - b) for a, b in zip(scores["none"], scores["int8"], strict=True))
    print(f"  largest score difference (random weights) {difference:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--method", choices=["vqa", "caption"], default="vqa")
    parser.add_argument("--full-size", action="store_true", help="also time a 1.3B-shaped model (~8 GB RAM)")
    parser.add_argument("--full-candidates", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each mode (small models)")
    parser.add_argument("--photos", action="store_true", help="also time loading 12 MP candidates (cached corpus)")
    parser.add_argument("--quantization", action="store_true", help="also fp32 against int8 on the CPU (1.3B-shaped)")
    parser.add_argument("--quantization-layers", type=int, default=4, help="of the 1.3B shape's 24 (RAM and time)")
    parser.add_argument("--quantization-candidates", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's own (one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gpu = "none (CPU only; no GPU figures measured)"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; GPU: {gpu}")
    images = make_images(args.candidates)
    with tempfile.TemporaryDirectory() as directory:
        for size, (sizes, image_size, patch_size) in SIZES.items():
            vlm = saved_model(Path(directory) / size, size, args.method)
            tokens = (image_size // patch_size) ** 2
            shape = f"hidden {sizes['hidden_size']}, {sizes['num_layers']} layers, {tokens} image tokens"
            label = f"{size} model ({shape})"
            compare(vlm, images, args.method, label, args.repeats)
            del vlm
    if args.full_size:
        full = full_size_model(args.method)
        label = "1.3B-shaped model (576 image tokens)"
        compare(full, make_images(args.full_candidates), args.method, label, repeats=1)
    if args.photos:
        compare_loading(args.candidates)
    if args.quantization:
        compare_quantization(args.quantization_layers, args.quantization_candidates, args.method, repeats=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nprocess peak RSS over the whole run: {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
