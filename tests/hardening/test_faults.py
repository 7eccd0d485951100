"""Faults, each with its figure: (a) a worker SIGKILLed mid-job, (b) the writer SIGKILLed during a FAISS save,
(c) Redis restarted during a job, (d) an embedded-Qdrant writer SIGKILLed, (e) the disk filling up mid-index.

Every process here is real (a `python -c` writer, `vlsearch worker`, `vlsearch serve`, a private redis-server, a
tmpfs mount); each test prints its figure and asserts it exactly. (a), (b) and (d) take about 75 s together on two
shared cores, (c) and (e) about 20 s each; (c) needs redis-server, (e) root to mount a tmpfs (else skipped, saying
why). Redis database 10 is these tests' own.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import redis

from bench.synthetic_vectors import isotropic
from core.service import Service
from core.settings import Settings
from retriever.faiss_store import INDEX_FILE, INDEX_META_FILE, FaissStore
from retriever.qdrant_store import QdrantStore
from retriever.store import Manifest
from tests.processes import empty_redis_db, start_worker
from tests.workers.test_index_job import children, kill
from workers.jobs import JobRecord, JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def start_child(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(child: subprocess.Popen[str], prefix: str, seconds: float = 60) -> str:
    """The child's next stdout line starting with prefix (earlier lines are skipped)."""
    assert child.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            raise AssertionError(f"the child ended before {prefix!r}: {child.stderr.read() if child.stderr else ''}")
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line within {seconds:g}s")


def kill_and_read(child: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child, reap it; the stdout lines it wrote that were not read yet."""
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    return [line.strip() for line in out.splitlines() if line.strip()]


# --- (a) a worker killed mid-job -----------------------------------------------------------------------------

WORKER_REDIS = "redis://127.0.0.1:6379/10"  # these tests' own database
SLOW_CHUNKS = "tests.workers.slow_chunks"  # chunks start half a second late: time to kill one mid-work
JOB_IMAGES, CHUNK = 12, 4
# what is killed for each of the five jobs: the pool child running its chunk (as the OOM killer picks it), or the
# whole worker (its chunk comes back to the next worker after the visibility timeout)
WORKER_KILLS = ("child", "worker", "child", "worker", "child")


@pytest.fixture
def worker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with empty_redis_db(WORKER_REDIS):
        yield {
            **CHILD_ENV,
            "VLSEARCH_REDIS_URL": WORKER_REDIS,
            "VLSEARCH_DATA_DIR": str(tmp_path / "data"),
            "VLSEARCH_CLIP_MODEL": "shapes-clip",
            "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
            "VLSEARCH_DEVICE": "cpu",
            "VLSEARCH_CHUNK_SIZE": str(CHUNK),
            "VLSEARCH_DECODE_WORKERS": "1",
            "VLSEARCH_VISIBILITY_TIMEOUT": "4",
        }


def distinct_images(root: Path, start: int, count: int) -> Path:
    """count small images, distinct from those of any other start (so each job adds its own)."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(start, start + count):
        Image.new("RGB", (40 + i, 32 + i % 7), (i * 7 % 256, i * 37 % 256, i * 91 % 256)).save(root / f"{i:03d}.png")
    return root


SUBMIT = """
import json, sys
from pathlib import Path
from core.container import build_settings
from workers.api import Jobs
jobs = Jobs(build_settings())
print(json.dumps([jobs.submit_index([Path(folder)], "photos").id for folder in sys.argv[1:]]))
"""


def wait_for_jobs(job_ids: list[str], log: Path, seconds: float = 120) -> list[JobRecord]:
    """The jobs' records, once every one has ended."""
    jobs = JobStore.from_url(WORKER_REDIS)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        records = [jobs.get(job_id) for job_id in job_ids]
        if all(record.is_final for record in records):
            return records
        time.sleep(0.25)
    raise AssertionError(f"jobs did not end: {records}; worker log:\n{log.read_text()[-3000:]}")


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chunk_in_progress(client: redis.Redis, job_id: str, seconds: float = 120) -> str:
    """A chunk of the job that a worker has taken (its attempt counted) but not finished, past the job's first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempted = {text(key) for key in client.hkeys(f"vlsearch:job:{job_id}:attempts")}
        counted = {text(member) for member in client.smembers(f"vlsearch:job:{job_id}:chunks")}
        if counted and attempted - counted:
            return sorted(attempted - counted)[0]
        time.sleep(0.002)
    raise AssertionError(f"no chunk of job {job_id} was seen in progress")


@pytest.mark.slow
def test_a_worker_killed_mid_job_five_times_completes_every_job_exactly_once(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    folders = [distinct_images(tmp_path / f"job{n}", n * JOB_IMAGES, JOB_IMAGES) for n in range(len(WORKER_KILLS))]
    log = tmp_path / "worker.log"
    client = redis.Redis.from_url(WORKER_REDIS)
    # Every job queued before the worker starts: watching starts before any chunk runs (a submitting process may
    # take longer to exit, on a busy machine, than the worker takes to finish the first job).
    submitted = subprocess.run(
        [sys.executable, "-c", SUBMIT, *map(str, folders)], cwd=REPO_ROOT, env=worker_env, capture_output=True,
        text=True, timeout=120, check=True,
    )  # fmt: skip
    job_ids: list[str] = json.loads(submitted.stdout)
    worker = start_worker(worker_env, log, include=[SLOW_CHUNKS])
    try:
        killed_chunks = []
        for job_id, what in zip(job_ids, WORKER_KILLS, strict=True):
            killed_chunks.append(chunk_in_progress(client, job_id))
            if what == "child":
                pool = children(worker.pid)
                assert pool, "the worker has no pool child"
                for child in pool:
                    os.kill(child, signal.SIGKILL)
            else:
                kill(worker)  # the worker and its pool: nothing acknowledges the chunk
                worker = start_worker(worker_env, log, include=[SLOW_CHUNKS])
        records = wait_for_jobs(job_ids, log)
    finally:
        kill(worker)
    chunks = JOB_IMAGES // CHUNK
    for record, job_id, chunk in zip(records, job_ids, killed_chunks, strict=True):
        assert (record.state, record.done, record.failed) == ("done", JOB_IMAGES, 0), record
        assert record.chunks_done == client.scard(f"vlsearch:job:{job_id}:chunks") == chunks  # each once
        assert int(client.hget(f"vlsearch:job:{job_id}:attempts", chunk) or 0) >= 2  # the killed one came back
    settings = Settings(data_dir=Path(worker_env["VLSEARCH_DATA_DIR"]), collection="photos")
    with Service(settings) as service:
        store = service.store()
        stored = list(store.scroll(with_vectors=True))
        vectors = np.stack([np.asarray(record.vector) for record in stored])
        paths = [path for record in stored for path in record.payload["paths"]]
        indexed = store.index_info().indexed  # type: ignore[attr-defined]  # the FAISS store's
        count = store.count()
    total = JOB_IMAGES * len(WORKER_KILLS)
    duplicates = len(stored) - len(np.unique(vectors, axis=0))
    print(
        f"\n(a) {len(WORKER_KILLS)} kills mid-job ({WORKER_KILLS.count('child')} pool children, "
        f"{WORKER_KILLS.count('worker')} whole workers): {sum(r.state == 'done' for r in records)}/"
        f"{len(records)} jobs completed, {count} indexed of {total}, {duplicates} duplicate vectors, "
        f"{len(paths) - len(set(paths))} paths recorded twice"
    )
    assert count == indexed == len(stored) == len({record.id for record in stored}) == total
    assert duplicates == 0 and sorted(paths) == sorted(str(p) for f in folders for p in f.iterdir())


# --- (b) the writer killed during a FAISS save ---------------------------------------------------------------

SAVE_DIM, SAVE_BASE, SAVE_BATCH = 64, 40_000, 8
SAVE_KILLS = 20

# Upserts a batch and saves once (timing the save), then upserts the round's batch and saves again: the parent
# kills it during that second save, at a moment drawn over the first save's duration. It reports the generation
# its index file was at before the save (index.json, written by its own first save).
SAVING_WRITER = """
import json, sys, time
from pathlib import Path
from bench.synthetic_vectors import isotropic
from retriever.faiss_store import FaissStore

directory, round_, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = FaissStore.open(directory)
for step in range(2):
    ids = [f"r{round_}-s{step}-{j}" for j in range(batch)]
    store.upsert(ids, isotropic(batch, store.manifest.dim, seed=1000 + round_ * 10 + step), [{"step": step}] * batch)
    before = json.loads((directory / "index.json").read_text())["generation"]
    print(f"saving {before} {store.count()}", flush=True)
    started = time.perf_counter()
    store.save()
    print(f"saved {time.perf_counter() - started:.6f}", flush=True)
time.sleep(60)
"""


@dataclass
class SaveFigure:
    old: int = 0  # index.faiss and index.json both from before the save
    new: int = 0  # both from the save
    between: int = 0  # index.faiss from the save, index.json from before (killed between the two renames)
    corrupt: int = 0
    missed: int = 0  # kills that came after the save had ended (drawn again)


def index_file_state(directory: Path, old_generation: int, old_count: int, new_count: int) -> str:
    """Which save the index files on disk come from: old, new, between (index new, meta old) or corrupt."""
    try:
        meta = json.loads((directory / INDEX_META_FILE).read_text())
        entries = faiss.read_index(str(directory / INDEX_FILE)).ntotal
    except (OSError, ValueError, RuntimeError):
        return "corrupt"
    index_age = {old_count: "old", new_count: "new"}.get(entries)
    meta_age = "old" if meta.get("generation") == old_generation else "new"
    if index_age is None:
        return "corrupt"
    if index_age == meta_age:
        return index_age
    return "between" if index_age == "new" else "corrupt"  # index.json is replaced after index.faiss, never before


def test_the_writer_killed_during_a_faiss_save_20_times_always_opens_at_the_old_or_the_new_index(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "c"
    manifest = Manifest(encoder="test-encoder", weights="untrained", dim=SAVE_DIM)
    ids = [f"{i:06d}" for i in range(SAVE_BASE)]  # a 10 MB index: a save takes 10-30 ms to write and fsync
    with FaissStore.open(directory, manifest) as store:
        store.upsert(ids, isotropic(SAVE_BASE, SAVE_DIM, seed=1), [{}] * SAVE_BASE)
    chance, figure, expected = random.Random(20), SaveFigure(), SAVE_BASE
    round_ = 0
    while figure.old + figure.new + figure.between + figure.corrupt < SAVE_KILLS:
        assert round_ < 4 * SAVE_KILLS, f"too many kills came after the save: {figure}"
        child = start_child(SAVING_WRITER, directory, round_, SAVE_BATCH)
        read_until(child, "saving")
        duration = float(read_until(child, "saved").split()[1])
        _, old_generation, new_count = read_until(child, "saving").split()
        time.sleep(chance.uniform(0.0, duration))
        after = kill_and_read(child)
        expected += 2 * SAVE_BATCH
        assert int(new_count) == expected
        if any(line.startswith("saved") for line in after):
            figure.missed += 1
        else:
            state = index_file_state(directory, int(old_generation), expected - SAVE_BATCH, expected)
            setattr(figure, state, getattr(figure, state) + 1)
        with FaissStore.open(directory) as store:  # every commit is there, whatever the index files held
            assert store.count() == store.index_info().indexed == expected
            batch = [f"r{round_}-s1-{j}" for j in range(SAVE_BATCH)]
            vectors = isotropic(SAVE_BATCH, SAVE_DIM, seed=1000 + round_ * 10 + 1)
            assert [record.id for record in store.get(batch)] == batch
            assert store.search(vectors[3], k=1)[0].id == batch[3]
            assert not list(directory.glob(".*.tmp"))  # a killed save's temp file is cleared on open
        round_ += 1
    print(
        f"\n(b) {SAVE_KILLS} kills during save: {figure.old} opened at the old index, {figure.new} at the new, "
        f"{figure.between} between the index and its meta, {figure.corrupt} corrupt ({figure.missed} kills came "
        f"after the save and were drawn again); every reopen held all {expected} committed points"
    )
    assert figure.corrupt == 0 and figure.old + figure.new + figure.between == SAVE_KILLS


def test_a_save_killed_between_the_index_and_its_meta_does_not_pair_the_new_index_with_the_old_meta(
    tmp_path: Path,
) -> None:
    """The `between` case of (b) after an IVF-PQ retrain: the old meta's training size (the collection at its
    first training) would make the next writer retrain at once; the store takes the size from the index instead."""
    directory = tmp_path / "c"
    manifest = Manifest(encoder="test-encoder", weights="untrained", dim=32, index_type="ivfpq")
    vectors = isotropic(1600, 32, seed=3)
    with FaissStore.open(directory, manifest, ivf_nlist=8, pq_m=8) as store:
        store.upsert([f"{i:04d}" for i in range(400)], vectors[:400], [{}] * 400)
        assert store.index_info().trained_on == 400
    first_meta = (directory / INDEX_META_FILE).read_bytes()
    with FaissStore.open(directory, manifest, ivf_nlist=8, pq_m=8) as store:
        store.upsert([f"{i:04d}" for i in range(400, 1600)], vectors[400:], [{}] * 1200)
        assert store.index_info().trained_on == 1600  # retrained at four times its first training
    (directory / INDEX_META_FILE).write_bytes(first_meta)  # as a kill between the two renames leaves it
    with FaissStore.open(directory, ivf_nlist=8, pq_m=8) as store:
        assert store.index_info().trained_on == 1600


# --- (d) embedded Qdrant reopened after a kill -------------------------------------------------------------

QDRANT_DIM, QDRANT_BATCH, QDRANT_KILLS = 16, 20, 5

# Writes batches (upsert, then delete the batch's first point) until it is killed, reporting each step.
QDRANT_WRITER = """
import sys
from pathlib import Path
from bench.synthetic_vectors import isotropic
from retriever.qdrant_store import QdrantStore

root, round_, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = QdrantStore.open("photos", path=root)
print(f"open {store.count()}", flush=True)
step = 0
while True:
    ids = [f"k{round_}-s{step}-{j}" for j in range(batch)]
    store.upsert(ids, isotropic(batch, store.manifest.dim, seed=round_ * 1000 + step), [{"tags": ["t"]}] * batch)
    print(f"upserted {step}", flush=True)
    store.delete([ids[0]])
    print(f"deleted {step}", flush=True)
    step += 1
"""


def test_embedded_qdrant_reopened_after_its_writer_is_killed_holds_every_finished_write(tmp_path: Path) -> None:
    manifest = Manifest(encoder="test-encoder", weights="untrained", dim=QDRANT_DIM, store="qdrant")
    with QdrantStore.open("photos", manifest, path=tmp_path) as store:
        store.upsert([f"base-{i}" for i in range(100)], isotropic(100, QDRANT_DIM, seed=1), [{}] * 100)
    chance, expected, mid_batch = random.Random(4), 100, 0
    for round_ in range(QDRANT_KILLS):
        child = start_child(QDRANT_WRITER, tmp_path, round_, QDRANT_BATCH)
        assert int(read_until(child, "open").split()[1]) == expected
        read_until(child, "deleted 1")
        time.sleep(chance.uniform(0.0, 0.2))
        lines = kill_and_read(child)
        reported = [line.split() for line in lines]
        deleted = max([1] + [int(step) for word, step in reported if word == "deleted"])
        upserted = max([1] + [int(step) for word, step in reported if word == "upserted"])
        with QdrantStore.open("photos", path=tmp_path) as store:
            for step in range(deleted + 1):  # finished steps: exactly the batch less its first point
                batch = [f"k{round_}-s{step}-{j}" for j in range(QDRANT_BATCH)]
                records = store.get(batch, with_vectors=True)
                assert [record.id for record in records] == batch[1:]
                written = isotropic(QDRANT_BATCH, QDRANT_DIM, seed=round_ * 1000 + step)[1:]
                assert np.allclose(np.stack([np.asarray(r.vector) for r in records]), written)
            # the step in flight: embedded Qdrant commits point by point, so a prefix of its batch (whole points)
            step = deleted + 1
            batch = [f"k{round_}-s{step}-{j}" for j in range(QDRANT_BATCH)]
            present = [record.id for record in store.get(batch)]
            if upserted == step:
                assert present in (batch, batch[1:])  # upserted; its delete may have committed
            else:
                assert present == batch[: len(present)]
                mid_batch += 0 < len(present) < QDRANT_BATCH
            expected += (deleted + 1) * (QDRANT_BATCH - 1) + len(present)
            assert store.count() == len({record.id for record in store.scroll()}) == expected
    print(
        f"\n(d) {QDRANT_KILLS} kills of an embedded-Qdrant writer: {QDRANT_KILLS}/{QDRANT_KILLS} reopened with "
        f"every finished write and nothing else ({expected} points at the end, counts exact); {mid_batch} "
        "caught mid-batch kept a prefix of it, whole points only"
    )


# --- (c) Redis restarted during a job ----------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """A private redis-server on port, persisting to directory (an append-only file, fsynced every second: a
    SIGKILL loses nothing it acknowledged), once it answers."""
    directory.mkdir(exist_ok=True)
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--appendonly", "yes", "--save", "", "--daemonize", "no"]
    with (directory / "redis.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")


def sigkill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="needs redis-server to restart a private Redis")
def test_redis_restarted_during_a_job_the_job_resumes_and_the_api_answers_503_for_jobs_but_goes_on_searching(
    tmp_path: Path,
) -> None:
    from core.keys import KeyStore
    from models.shapes_world import generate_scenes, write_collection
    from tests.api.conftest import free_port, model_settings, server_env, start_server, stop_server

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data_dir, folder = tmp_path / "data", tmp_path / "arriving"
    write_collection(generate_scenes("test", 6, seed=5), tmp_path / "searched", size=64)
    write_collection(generate_scenes("test", 20, seed=77), folder, size=64)
    with Service(model_settings(data_dir)) as service:
        service.index([tmp_path / "searched"], "shapes")
    key = KeyStore.from_settings(model_settings(data_dir)).create("read,write", name="faults").secret
    redis_server = start_redis(tmp_path / "redis", port)
    env = server_env(data_dir, redis_url=url, chunk_size=str(CHUNK), visibility_timeout="6")
    worker = start_worker(env, tmp_path / "worker.log", include=[SLOW_CHUNKS])
    server = None
    outage: dict[str, list[int]] = {"jobs": [], "search": []}
    slowest = 0.0
    try:
        server = start_server(data_dir, tmp_path / "server.log", redis_url=url, chunk_size=str(CHUNK))
        with server.client(key) as api:
            submitted = api.post("/v1/jobs", json={"kind": "index", "collection": "arriving", "paths": [str(folder)]})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            chunk_in_progress(redis.Redis(port=port), job_id)
            sigkill(redis_server)  # mid-chunk
            down_until = time.monotonic() + 4
            while time.monotonic() < down_until:
                started = time.monotonic()
                answers = [
                    api.get(f"/v1/jobs/{job_id}"),
                    api.get("/v1/jobs"),
                    api.post("/v1/jobs", json={"kind": "index", "collection": "arriving", "paths": [str(folder)]}),
                ]
                slowest = max(slowest, (time.monotonic() - started) / len(answers))
                for answer in answers:
                    outage["jobs"].append(answer.status_code)
                    assert answer.json()["error"]["code"] == "store_unavailable" and "Traceback" not in answer.text
                    assert "VLSEARCH_REDIS_URL" in answer.json()["error"]["message"]
                outage["search"].append(api.post("/v1/search", json={"text": "a red circle", "k": 5}).status_code)
                time.sleep(0.05)  # the worker shares the two cores
            redis_server = start_redis(tmp_path / "redis", port)  # the same files: the queue and the jobs come back
            deadline = time.monotonic() + 90
            while (record := api.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"{record}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
                time.sleep(0.25)
            listed = api.get("/v1/jobs")
        client = redis.Redis(port=port)
        attempts = {text(k): int(v) for k, v in client.hgetall(f"vlsearch:job:{job_id}:attempts").items()}
        counted = client.scard(f"vlsearch:job:{job_id}:chunks")
    finally:
        if server is not None:
            stop_server(server)
        kill(worker)
        sigkill(redis_server)
    with Service(model_settings(data_dir)) as service:
        store = service.store("arriving")
        stored = list(store.scroll())
        count = store.count()
    print(
        f"\n(c) Redis SIGKILLed mid-chunk and restarted 4 s later: during the outage {len(outage['jobs'])} job-route "
        f"answers, all {sorted(set(outage['jobs']))} (slowest {slowest * 1000:.0f} ms), {len(outage['search'])} "
        f"searches, all {sorted(set(outage['search']))}; the job ended {record['state']!r} with "
        f"{record['done']}/{record['total']} done, {record['failed']} failed, {counted}/{record['chunks']} chunks "
        f"counted once (deliveries {sorted(attempts.values(), reverse=True)}); {count} images stored, "
        f"{count - len({r.id for r in stored})} twice"
    )
    assert set(outage["jobs"]) == {503} and set(outage["search"]) == {200} and slowest < 2.0
    assert (record["state"], record["done"], record["failed"]) == ("done", 20, 0), record
    assert record["chunks_done"] == counted == record["chunks"] == 20 // CHUNK and listed.status_code == 200
    assert count == len({r.id for r in stored}) == len(stored) == 20


# --- (e) the disk fills during indexing --------------------------------------------------------------------


@contextmanager
def small_disk(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of size at mountpoint (root only), unmounted after; the test is skipped where mounting fails."""
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs a tmpfs mount, which failed here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_during_indexing_ends_it_with_one_clear_line_and_the_collection_still_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = distinct_images(tmp_path / "images", 0, 400)  # about 1 MB of SQLite: more than the disk holds
    with small_disk(tmp_path / "disk", "1m") as disk:
        env = {
            **CHILD_ENV,
            "VLSEARCH_DATA_DIR": str(disk / "data"),
            "VLSEARCH_CLIP_MODEL": "shapes-clip",
            "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
            "VLSEARCH_DEVICE": "cpu",
            "VLSEARCH_DECODE_WORKERS": "1",
        }
        command = [str(Path(sys.executable).parent / "vlsearch"), "index", str(folder), "-c", "photos"]
        full = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        settings = Settings(data_dir=disk / "data", collection="photos")
        with Service(settings) as service:  # on the disk still full
            store = service.store()
            kept = store.count()
            consistent = kept == store.index_info().indexed == len({r.id for r in store.scroll()})  # type: ignore[attr-defined]
            first = next(iter(store.scroll(with_vectors=True)))
            hits = service.search_vector(np.asarray(first.vector), k=3)
        # a job chunk on the full disk: failed with the same reason, counted, the job ended (not retried forever)
        for name, value in {**env, "VLSEARCH_REDIS_URL": WORKER_REDIS}.items():
            if name.startswith("VLSEARCH_"):
                monkeypatch.setenv(name, value)
        from workers import tasks

        monkeypatch.setattr(tasks, "_SERVICE", None)
        monkeypatch.setattr(tasks, "_JOBS", None)
        jobs = JobStore.from_url(WORKER_REDIS)
        paths = sorted(str(path) for path in folder.iterdir())[-CHUNK:]
        job = jobs.create("index", "photos", str(folder), {}, total=CHUNK, chunks=1)
        try:
            tasks.index_chunk.run(job.id, "c0", "photos", paths)
            record = jobs.get(job.id)
        finally:
            tasks.service().close()
            for key in jobs.client.scan_iter(f"vlsearch:job:{job.id}*"):
                jobs.client.delete(key)
            jobs.client.zrem("vlsearch:jobs", job.id)
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
        again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    line = full.stderr.strip()
    print(
        f"\n(e) a 1 MB data disk filled after {kept} of 400 images: exit {full.returncode}, stderr "
        f"{len(line.splitlines())} line: {line!r}; the collection opened on the full disk with {kept} "
        f"images, consistent={consistent}, search answered {len(hits.hits)} hits; a job chunk there ended "
        f"{record.state!r} ({record.failed}/{record.total} failed: {[e.error for e in record.errors]}); once space was "
        f"freed, indexing again: exit {again.returncode}, {again.stdout.strip().splitlines()[-1].split('; ')[-1]}"
    )
    assert full.returncode == 1 and len(line.splitlines()) == 1 and "Traceback" not in full.stderr
    assert "disk" in line and "is full" in line and "VLSEARCH_DATA_DIR" in line
    assert 0 < kept < 400 and consistent and len(hits.hits) == 3
    assert (record.state, record.failed, record.chunks_done) == ("done", CHUNK, 1) and "is full" in record.errors[
        0
    ].reason
    assert again.returncode == 0 and "holds 400 images" in again.stdout


def test_an_index_save_that_meets_a_full_disk_is_storage_full_and_leaves_the_last_index_and_no_temp_file(
    tmp_path: Path,
) -> None:
    from retriever.errors import StorageFull

    with small_disk(tmp_path / "disk", "4m") as disk:
        directory = disk / "c"
        store = FaissStore.open(directory, Manifest(encoder="test-encoder", weights="untrained", dim=64))
        store.upsert([f"{i:04d}" for i in range(1500)], isotropic(1500, 64, seed=1), [{}] * 1500)
        store.save()  # a 400 KB index
        saved = (directory / INDEX_FILE).read_bytes()
        store.upsert(["late"], isotropic(1, 64, seed=2), [{}])
        free = os.statvfs(disk)
        (disk / "ballast").write_bytes(bytes(free.f_bavail * free.f_frsize - 100_000))  # room for SQLite, not it
        with pytest.raises(StorageFull, match=r"the disk holding the index .* is full \(No space left on device\)"):
            store.save()
        assert (directory / INDEX_FILE).read_bytes() == saved and not list(directory.glob(".*.tmp"))
        (disk / "ballast").unlink()
        store.close()
        with FaissStore.open(directory) as reopened:
            assert reopened.count() == reopened.index_info().indexed == 1501
