"""Indexing on the workers against indexing in-process, measured side by side in one run, in interleaved rounds.

    .venv/bin/python bench/workers.py [--images 300] [--rounds 2] [--model ViT-B-32]

The same folder of 12 MP photo-like JPEGs (bench/indexing.py's) into a new collection each time:
(a) in-process, `vlsearch index` (its own timing of the pipeline, without process start or model load);
(b) one `vlsearch worker` (concurrency 1, the same cores) through `vlsearch submit index` until the job is done
    (the job's started-to-finished time: the worker is warm, as a deployment's is);
(c) two workers pinned to one core each (taskset) against (a) with both cores (chunks of 64, to share out).
Rounds go a, b, c, a, b, c, …; the ratios are medians over the rounds with their spread. Then the per-chunk
overhead: a job of one-image chunks on a warm worker, its time per chunk less that of a one-image index call
in-process (broker round trip, job bookkeeping, the store's save).
Needs Redis (database 11 of VLSEARCH_BENCH_REDIS, default redis://127.0.0.1:6379/11, flushed). Random weights
(VLSEARCH_CLIP_PRETRAINED=none): speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: its folder comes first on sys.path, and this file would shadow `workers`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import redis
from PIL import Image

from bench.indexing import make_photos

REPO_ROOT = Path(__file__).resolve().parent.parent
VLSEARCH = str(Path(sys.executable).parent / "vlsearch")


def environment(data_dir: Path, model: str, redis_url: str, chunk_size: int, decode_workers: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "VLSEARCH_DATA_DIR": str(data_dir),
        "VLSEARCH_REDIS_URL": redis_url,
        "VLSEARCH_CLIP_MODEL": model,
        "VLSEARCH_CLIP_PRETRAINED": "none",
        "VLSEARCH_DEVICE": "cpu",
        "VLSEARCH_CHUNK_SIZE": str(chunk_size),
        "VLSEARCH_DECODE_WORKERS": str(decode_workers),
    }


def run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([VLSEARCH, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"vlsearch {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def in_process(env: dict[str, str], folder: Path, collection: str) -> float:
    """(a) images/s of `vlsearch index`, by its own report (pipeline time)."""
    report = json.loads(run(env, "index", str(folder), "-c", collection, "--json"))
    assert report["added"] == report["files"] and not report["failed"], report["failed"][:3]
    return float(report["files"]) / float(report["seconds"])


class Workers:
    """`vlsearch worker` processes (each optionally pinned to cores), stopped on exit."""

    def __init__(self, env: dict[str, str], cpus: list[str | None], log: Path) -> None:
        self.processes = []
        for cpu in cpus:
            pin = ["taskset", "-c", cpu] if cpu is not None else []
            command = [*pin, VLSEARCH, "worker", "--queues", "embed", "--concurrency", "1", "--loglevel", "warning"]
            self.processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log.open("ab"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def job(env: dict[str, str], folder: Path, collection: str) -> dict[str, object]:
    """Submit an index job with `vlsearch submit` and wait for it to end; its record. Followed through the Python
    API (workers.jobs), not by running `vlsearch job` again and again: each such process would take a core."""
    from workers.jobs import JobStore

    submitted = json.loads(run(env, "submit", "index", str(folder), "-c", collection, "--json"))
    jobs = JobStore.from_url(env["VLSEARCH_REDIS_URL"])
    while True:
        record = jobs.get(str(submitted["id"]))
        if record.is_final:
            assert record.state == "done" and record.failed == 0, record
            return record.to_dict()
        time.sleep(0.5)


def job_rate(record: dict[str, object]) -> float:
    return float(record["done"]) / (float(record["finished"]) - float(record["started"]))  # type: ignore[arg-type]


def one_image_calls(data_dir: Path, model: str, cores: int, images: list[Path]) -> float:
    """Seconds per `Service.index` call of one image in this process (what a one-image chunk does, without the
    broker and the job's bookkeeping), the first call (model load, new collection) not counted."""
    from core.service import Service
    from core.settings import Settings

    settings = Settings(data_dir=data_dir, clip_model=model, clip_pretrained=None, device="cpu", decode_workers=cores)
    with Service(settings) as service:
        service.index(images[:1], "direct")
        started = time.perf_counter()
        for image in images[1:]:
            service.index([image], "direct")
        return (time.perf_counter() - started) / (len(images) - 1)


def warm(env: dict[str, str], folder: Path) -> None:
    """One small job so that every worker's pool child has loaded the model before anything is timed."""
    job(env, folder, "warm-up")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--chunk-size", type=int, default=256, help="(b): the shipped VLSEARCH_CHUNK_SIZE")
    parser.add_argument("--shared-chunk-size", type=int, default=64, help="(c): small enough to share out")
    parser.add_argument("--overhead-chunks", type=int, default=100)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    redis_url = os.environ.get("VLSEARCH_BENCH_REDIS", "redis://127.0.0.1:6379/11")
    redis.Redis.from_url(redis_url).flushdb()
    photos = make_photos(args.images)
    print(f"machine: {cores} cores; corpus: {len(photos)} JPEGs 4000x3000; model {args.model} (random weights)")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "photos"
        folder.mkdir()
        for path in photos:  # hard links: a folder's symbolic links leading out of it are refused, not followed
            try:
                os.link(path, folder / path.name)
            except OSError:  # another file system
                shutil.copyfile(path, folder / path.name)
        small = root / "small"
        small.mkdir()
        for i in range(max(args.overhead_chunks, 8)):
            Image.new("RGB", (96, 72), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(small / f"{i:04d}.png")
        warm_folder = root / "warm"
        shutil.copytree(small, warm_folder, ignore=lambda _, names: names[8:])
        log = root / "workers.log"

        both = environment(root / "data", args.model, redis_url, args.chunk_size, decode_workers=cores)
        one_core = environment(root / "data", args.model, redis_url, args.shared_chunk_size, decode_workers=1)
        a_rates, b_rates, c_rates = [], [], []
        for number in range(args.rounds):
            a_rates.append(in_process(both, folder, f"a{number}"))
            with Workers(both, [None], log):
                warm(both, warm_folder)
                b_rates.append(job_rate(job(both, folder, f"b{number}")))
            with Workers(one_core, [str(cpu) for cpu in sorted(os.sched_getaffinity(0))], log):
                warm(one_core, warm_folder)
                c_rates.append(job_rate(job(one_core, folder, f"c{number}")))
            print(
                f"round {number + 1}: (a) in-process {a_rates[-1]:.2f} img/s, (b) one worker {b_rates[-1]:.2f}, "
                f"(c) {cores} one-core workers {c_rates[-1]:.2f}"
            )

        # Per-chunk overhead: one-image chunks on a warm worker, against the same one-image calls in this process.
        tiny = environment(root / "data", args.model, redis_url, chunk_size=1, decode_workers=cores)
        in_process_per_image = one_image_calls(root / "direct", args.model, cores, sorted(small.iterdir()))
        with Workers(tiny, [None], log):
            warm(tiny, warm_folder)
            record = job(tiny, small, "overhead-b")
        per_chunk = (float(record["finished"]) - float(record["started"])) / int(record["chunks"])  # type: ignore[arg-type, call-overload]

    b_ratio = [b / a for a, b in zip(a_rates, b_rates, strict=True)]
    c_ratio = [c / a for a, c in zip(a_rates, c_rates, strict=True)]
    print(f"(a) in-process {spread(a_rates)} img/s")
    print(f"(b) one worker {spread(b_rates)} img/s; b/a {spread(b_ratio)} (target >= 0.85)")
    print(f"(c) {cores} workers of one core {spread(c_rates)} img/s; c/a {spread(c_ratio)}")
    print(
        f"per-chunk overhead: {(per_chunk - in_process_per_image) * 1000:.1f} ms "
        f"({args.overhead_chunks} one-image chunks: {per_chunk * 1000:.1f} ms each on the worker, "
        f"{in_process_per_image * 1000:.1f} ms per one-image call in-process)"
    )


if __name__ == "__main__":
    main()
