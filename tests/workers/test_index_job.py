"""An index job end to end: `vlsearch submit index` to real Redis (database 8), a real `vlsearch worker` subprocess
(a Celery prefork worker, not eager mode), the job followed with `vlsearch job`, the collection checked after."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import redis

from core.service import Service
from core.settings import Settings
from tests.processes import start_worker, stop
from workers.jobs import JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/8"
VLSEARCH = [str(Path(sys.executable).parent / "vlsearch")]  # the installed console script
SLOW_CHUNKS = "tests.workers.slow_chunks"  # its chunks start half a second late: a worker killed mid-chunk


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()  # database 8 is these tests' own
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "VLSEARCH_REDIS_URL": REDIS_URL,
        "VLSEARCH_DATA_DIR": str(tmp_path / "data"),
        "VLSEARCH_CLIP_MODEL": "shapes-clip",
        "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
        "VLSEARCH_DEVICE": "cpu",
        "VLSEARCH_CHUNK_SIZE": "4",
        "VLSEARCH_DECODE_WORKERS": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_worker(env, tmp_path / "worker.log", concurrency=2)
    yield process
    stop(process)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VLSEARCH, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def wait_for_end(env: dict[str, str], job_id: str, tmp_path: Path, seconds: float = 180) -> dict[str, object]:
    """The job's record as `vlsearch job ID --json` prints it, once it has ended. Followed through the Python API
    meanwhile: a `vlsearch` process every half second would take a core from the worker under test."""
    jobs = JobStore.from_url(env["VLSEARCH_REDIS_URL"])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if jobs.get(job_id).is_final:
            return json.loads(cli(env, "job", job_id, "--json").stdout)  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not end; worker log:\n{(tmp_path / 'worker.log').read_text()[-3000:]}")


@pytest.mark.slow
def test_an_index_job_over_good_and_corrupt_images_completes_with_exact_counts(
    env: dict[str, str], worker: subprocess.Popen[bytes], image_folder: Path, tmp_path: Path
) -> None:
    (image_folder / "home" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "trip" / "empty.png").write_bytes(b"")
    submitted = cli(env, "submit", "index", str(image_folder), "--collection", "photos", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert (job["kind"], job["total"], job["chunks"]) == ("index", 10, 3)
    record = wait_for_end(env, job["id"], tmp_path)
    assert (record["state"], record["done"], record["failed"], record["chunks_done"]) == ("done", 10, 2, 3)
    failed = {Path(str(error["source"])).name: error["error"] for error in record["errors"]}  # type: ignore[attr-defined]
    assert failed == {"broken.jpg": "CorruptImage", "empty.png": "UnsupportedImage"}
    listed = cli(env, "jobs")
    assert job["id"] in listed.stdout and "done" in listed.stdout
    settings = Settings(data_dir=Path(env["VLSEARCH_DATA_DIR"]), collection="photos")
    with Service(settings) as service:
        assert service.info().count == 8  # every good image once (two pool children wrote the new collection)
    # the same job again changes nothing: ids are content hashes
    again = json.loads(cli(env, "submit", "index", str(image_folder), "-c", "photos", "--json").stdout)
    assert wait_for_end(env, again["id"], tmp_path)["done"] == 10
    with Service(settings) as service:
        assert service.info().count == 8


def test_a_cancelled_job_ends_its_remaining_chunks_without_work(env: dict[str, str], image_folder: Path) -> None:
    """No worker runs: the job is cancelled while queued, then a worker-side chunk finds the flag and does nothing
    (the task body runs in this process: only the flag check is under test here)."""
    submitted = cli(env, "submit", "index", str(image_folder), "--collection", "photos", "--json")
    job = json.loads(submitted.stdout)
    cancelled = cli(env, "job", job["id"], "--cancel", "--json")
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    os.environ.update({key: value for key, value in env.items() if key.startswith("VLSEARCH_")})
    try:
        from workers import tasks

        assert tasks.index_chunk.run(job["id"], "c0", "photos", [str(image_folder / "trip" / "img0.png")]) == {
            "done": 0,
            "failed": 0,
        }
    finally:
        for key in env:
            if key.startswith("VLSEARCH_"):
                os.environ.pop(key, None)
    assert not (Path(env["VLSEARCH_DATA_DIR"]) / "collections" / "photos").exists()  # nothing was written
    assert JobStore.from_url(REDIS_URL).get(job["id"]).state == "cancelled"


def test_an_unreachable_redis_is_one_line_naming_the_variable(env: dict[str, str], image_folder: Path) -> None:
    result = cli({**env, "VLSEARCH_REDIS_URL": "redis://127.0.0.1:1/0"}, "submit", "index", str(image_folder))
    assert result.returncode != 0
    assert "VLSEARCH_REDIS_URL" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def many_images(root: Path, count: int) -> Path:
    """count distinct small images (40 files in chunks of 4: ten chunks to kill a worker in the middle of)."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (48 + i, 40), (i * 6 % 256, (i * 37) % 256, (i * 91) % 256)).save(root / f"{i:03d}.png")
    return root


def kill(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and its pool (its process group), as an out-of-memory kill would, and reap it."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for_a_chunk_in_progress(job_id: str, seconds: float = 120) -> str:
    """A chunk that a worker has taken (its attempt is counted) but not finished: killing now kills it mid-work."""
    client = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempted = {key.decode() for key in client.hkeys(f"vlsearch:job:{job_id}:attempts")}
        counted = {member.decode() for member in client.smembers(f"vlsearch:job:{job_id}:chunks")}
        running = sorted(attempted - counted)
        if running and counted:  # past the first chunk: the collection exists, the models are loaded
            return running[0]
        time.sleep(0.002)
    raise AssertionError("no chunk was seen in progress")


def check_collection(env: dict[str, str], expected: int) -> None:
    settings = Settings(data_dir=Path(env["VLSEARCH_DATA_DIR"]), collection="photos")
    with Service(settings) as service:
        store = service.store()
        records = list(store.scroll())
        assert len(records) == len({record.id for record in records}) == expected  # each image once
        assert store.count() == expected


@pytest.mark.slow
def test_a_pool_child_killed_mid_chunk_has_its_chunk_delivered_again_and_the_job_completes(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = many_images(tmp_path / "many", 40)
    worker = start_worker(env, tmp_path / "worker.log", include=[SLOW_CHUNKS])
    try:
        job = json.loads(cli(env, "submit", "index", str(folder), "-c", "photos", "--json").stdout)
        chunk = wait_for_a_chunk_in_progress(job["id"])
        killed = children(worker.pid)
        assert killed, "the worker has no pool child"
        for child in killed:
            os.kill(child, signal.SIGKILL)
        record = wait_for_end(env, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"], record["chunks_done"]) == ("done", 40, 0, 10)
        attempts = redis.Redis.from_url(REDIS_URL).hget(f"vlsearch:job:{job['id']}:attempts", chunk)
        assert attempts is not None and int(attempts) >= 2, "the killed chunk was not delivered again"
        check_collection(env, 40)
    finally:
        kill(worker)


@pytest.mark.slow
def test_a_whole_worker_killed_mid_job_leaves_its_chunk_to_the_next_worker_after_the_visibility_timeout(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "VLSEARCH_VISIBILITY_TIMEOUT": "4"}
    folder = many_images(tmp_path / "many", 40)
    first = start_worker(env, tmp_path / "worker.log", include=[SLOW_CHUNKS])
    job = json.loads(cli(env, "submit", "index", str(folder), "-c", "photos", "--json").stdout)
    try:
        wait_for_a_chunk_in_progress(job["id"])
    finally:
        kill(first)  # the worker and its pool: nothing acknowledges the message
    assert json.loads(cli(env, "job", job["id"], "--json").stdout)["state"] == "running"
    second = start_worker(env, tmp_path / "worker.log", include=[SLOW_CHUNKS])
    try:
        record = wait_for_end(env, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"], record["chunks_done"]) == ("done", 40, 0, 10)
        check_collection(env, 40)
    finally:
        kill(second)


@pytest.mark.slow
def test_tag_and_caption_jobs_on_the_workers_write_tags_and_only_missing_captions(
    env: dict[str, str], tmp_path: Path
) -> None:
    from models.shapes_world import COLOURS, SHAPES, generate_scenes, write_collection
    from retriever.store import PayloadUpdate
    from retriever.tagging import read_exported_tags

    env = {**env, "VLSEARCH_VLM_MODEL": "shapes-vlm", "VLSEARCH_VLM_DEVICE": "cpu", "VLSEARCH_VLM_MAX_NEW_TOKENS": "12"}
    folder = tmp_path / "scenes"
    write_collection(generate_scenes("test", 10, seed=5), folder, size=64)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES) + "\n")
    settings = Settings(
        data_dir=Path(env["VLSEARCH_DATA_DIR"]),
        collection="photos",
        clip_model="shapes-clip",
        clip_pretrained=None,
        text_templates=["{}"],
        vlm_model="shapes-vlm",
        vlm_device="cpu",
        device="cpu",
    )
    with Service(settings) as service:
        service.index([folder])
        ids = service.point_ids()
        identity = service._vlm().identity
        service.store().update_payloads({ids[0]: PayloadUpdate(captions={identity: "kept as it was"})})
    worker = start_worker(env, tmp_path / "worker.log", queues="embed,vlm")
    try:
        tag = json.loads(cli(env, "submit", "tag", "--labels", str(labels), "-c", "photos", "--json").stdout)
        caption = json.loads(cli(env, "submit", "caption", "-c", "photos", "--json").stdout)
        assert (tag["total"], caption["total"]) == (10, 10)
        for job in (tag, caption):
            assert wait_for_end(env, job["id"], tmp_path)["state"] == "done"
        with Service(settings) as service:
            payloads = {record.id: record.payload for record in service.store().get(ids)}
        assert sum(bool(payload.get("tags")) for payload in payloads.values()) >= 8
        assert payloads[ids[0]]["captions"][identity] == "kept as it was"  # it had one: not captioned again
        assert all(payloads[i]["captions"][identity] for i in ids)
        again = json.loads(cli(env, "submit", "caption", "-c", "photos", "--json").stdout)
        assert wait_for_end(env, again["id"], tmp_path)["state"] == "done"
        with Service(settings) as service:
            assert {record.id: record.payload for record in service.store().get(ids)} == payloads  # nothing new
        for format in ("jsonl", "csv"):
            out = tmp_path / f"tags.{format}"
            assert cli(env, "export-tags", "--format", format, "--output", str(out), "-c", "photos").returncode == 0
            exported = read_exported_tags(out.read_text(), format)
            assert {image.id: sorted(image.tags) for image in exported} == {
                i: sorted(payloads[i].get("tags", [])) for i in ids
            }
    finally:
        kill(worker)


def test_the_same_chunk_delivered_twice_changes_neither_the_store_nor_the_counts(
    env: dict[str, str], image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task body run twice for one chunk, in this process (the redelivery itself is the kill tests' part):
    the second run rewrites the same points (content-hash ids) and is not counted again."""
    for key, value in env.items():
        if key.startswith("VLSEARCH_"):
            monkeypatch.setenv(key, value)
    from workers import tasks

    monkeypatch.setattr(tasks, "_SERVICE", None)
    monkeypatch.setattr(tasks, "_JOBS", None)
    paths = sorted(str(path) for path in image_folder.rglob("*") if path.is_file())
    jobs = JobStore.from_url(REDIS_URL)
    job = jobs.create("index", "photos", str(image_folder), {}, total=len(paths), chunks=1)
    for _ in range(2):
        tasks.index_chunk.run(job.id, "c0", "photos", paths)
    record = jobs.get(job.id)
    assert (record.state, record.done, record.failed, record.chunks_done) == ("done", 8, 0, 1)
    store = tasks.service().store("photos")
    records = list(store.scroll())
    assert len(records) == 8 and all(len(r.payload["paths"]) == 1 for r in records)  # no path recorded twice
    tasks.service().close()


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_no_chunk_after_the_flag_writes(env: dict[str, str], tmp_path: Path) -> None:
    folder = many_images(tmp_path / "many", 40)
    worker = start_worker(env, tmp_path / "worker.log", include=[SLOW_CHUNKS])
    client = redis.Redis.from_url(REDIS_URL)
    try:
        job = json.loads(cli(env, "submit", "index", str(folder), "-c", "photos", "--json").stdout)
        wait_for_a_chunk_in_progress(job["id"])
        cancelled = JobStore.from_url(REDIS_URL).cancel(job["id"])  # as `vlsearch job ID --cancel` does
        assert cancelled.state == "cancelled"
        attempted_at_cancel = client.hlen(f"vlsearch:job:{job['id']}:attempts")
        deadline = time.monotonic() + 60
        while client.llen("embed") and time.monotonic() < deadline:  # the remaining chunks are taken and end
            time.sleep(0.2)
        time.sleep(2.0)  # the last one taken has ended
        attempted = client.hlen(f"vlsearch:job:{job['id']}:attempts")
        assert attempted <= attempted_at_cancel + 1 < 10  # at most the chunk being taken as the flag was set
        record = json.loads(cli(env, "job", job["id"], "--json").stdout)
        assert record["state"] == "cancelled" and record["chunks_done"] <= attempted
        settings = Settings(data_dir=Path(env["VLSEARCH_DATA_DIR"]), collection="photos")
        with Service(settings) as service:
            assert service.info().count <= 4 * attempted  # only chunks begun before the flag wrote
    finally:
        kill(worker)


@pytest.mark.slow
def test_a_chunk_that_kills_its_worker_every_time_is_failed_after_the_maximum_attempts(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A chunk whose pool child dies on every delivery (tests/workers/poison_chunks.py) is given up at its
    VLSEARCH_MAX_CHUNK_ATTEMPTS + 1st delivery, with the reason; the other chunks are indexed and the job ends."""
    env = {**env, "VLSEARCH_MAX_CHUNK_ATTEMPTS": "2"}
    folder = many_images(tmp_path / "many", 8)  # chunks of 4: c0 = 000..003, c1 = 004..007
    (folder / "004.png").rename(folder / "poison.png")  # sorted last: c1 = 005, 006, 007, poison
    worker = start_worker(env, tmp_path / "worker.log", include=["tests.workers.poison_chunks"])
    try:
        job = json.loads(cli(env, "submit", "index", str(folder), "-c", "photos", "--json").stdout)
        record = wait_for_end(env, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"], record["chunks_done"]) == ("done", 8, 4, 2)
        [error] = record["errors"]  # type: ignore[misc]
        assert error["error"] == "ChunkFailed" and "VLSEARCH_MAX_CHUNK_ATTEMPTS" in error["reason"]
        attempts = redis.Redis.from_url(REDIS_URL).hget(f"vlsearch:job:{job['id']}:attempts", "c1")
        assert attempts is not None and int(attempts) == 3  # two deliveries killed their child, the third gave up
        check_collection(env, 4)
    finally:
        kill(worker)


@pytest.mark.slow
def test_a_verified_tag_job_with_the_shipped_models_tags_each_image_with_exactly_its_objects(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The issue's figure: shapes-world test scenes, the 24 object labels as a plain label file, `submit tag
    --verify` (shapes-clip's candidates from the stored vectors, confirmed by shapes-vlm on the vlm queue);
    precision and recall of the stored tags against the scenes' objects, per tag and overall."""
    from models.shapes_world import COLOURS, SHAPES, generate_scenes, read_collection, write_collection

    scenes, labels_list = 300, [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    env = {**env, "VLSEARCH_VLM_MODEL": "shapes-vlm", "VLSEARCH_VLM_DEVICE": "cpu", "VLSEARCH_CHUNK_SIZE": "100"}
    folder = tmp_path / "scenes"
    write_collection(generate_scenes("test", scenes, seed=2024), folder, size=64)
    labels = tmp_path / "objects.txt"
    labels.write_text("\n".join(labels_list) + "\n")
    settings = Settings(
        data_dir=Path(env["VLSEARCH_DATA_DIR"]),
        collection="scenes",
        clip_model="shapes-clip",
        clip_pretrained=None,
        text_templates=["{}"],
        device="cpu",
    )
    with Service(settings) as service:
        service.index([folder])
        by_path = service.store().ids_by_path([str(path) for path, _ in read_collection(folder)])
    truth = {
        by_path[str(path)]: {f"{o.colour} {o.shape}" for o in scene.objects} for path, scene in read_collection(folder)
    }
    worker = start_worker(env, tmp_path / "worker.log", queues="vlm")  # only the vlm queue: verify runs there
    try:
        submitted = cli(env, "submit", "tag", "--labels", str(labels), "--verify", "-c", "scenes", "--json")
        job = json.loads(submitted.stdout)
        record = wait_for_end(env, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"]) == ("done", scenes, 0)
    finally:
        kill(worker)
    with Service(settings) as service:
        tags = {record.id: set(record.payload.get("tags", [])) for record in service.store().scroll()}
    per_label = {label: [0, 0, 0] for label in labels_list}  # true positives, false positives, false negatives
    for image_id, objects in truth.items():
        for label in tags[image_id] | objects:
            per_label[label][0 if label in tags[image_id] & objects else 1 if label in tags[image_id] else 2] += 1
    tp, fp, fn = (sum(counts[i] for counts in per_label.values()) for i in range(3))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    print(f"\n{'tag':16s} {'precision':>9s} {'recall':>7s}")
    for label, (t, f, n) in per_label.items():
        print(f"{label:16s} {t / max(t + f, 1):9.2f} {t / max(t + n, 1):7.2f}")
    print(f"{'overall':16s} {precision:9.3f} {recall:7.3f}   ({scenes} test scenes, tp {tp} fp {fp} fn {fn})")
    assert precision >= 0.90 and recall >= 0.80


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def image_server(image_folder: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving image_folder (and a corrupt file); the paths it was asked for."""
    (image_folder / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _CountingHandler.requests = []
    handler = functools.partial(_CountingHandler, directory=str(image_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.requests
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_url_listing_is_refused_before_any_connection_unless_that_server_is_allowed(
    env: dict[str, str], image_server: tuple[str, list[str]], image_folder: Path, tmp_path: Path
) -> None:
    base, requests = image_server
    files = sorted(path.relative_to(image_folder).as_posix() for path in image_folder.rglob("img*"))
    listing = tmp_path / "urls.txt"
    urls = [f"{base}/{name}" for name in files] + [f"{base}/trip/broken.jpg", f"{base}/missing.png"]
    listing.write_text("# photos on a local server\n" + "\n".join(urls) + "\n\n")
    worker = start_worker(env, tmp_path / "worker.log")  # the guard as it ships: loopback refused
    try:
        job = json.loads(cli(env, "submit", "index", "--urls", str(listing), "-c", "photos", "--json").stdout)
        assert (job["total"], job["source"]) == (10, str(listing))
        record = wait_for_end(env, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"]) == ("done", 10, 10)
        assert {error["error"] for error in record["errors"]} == {"FetchRefused"}  # type: ignore[attr-defined]
        assert requests == []  # refused before any connection
    finally:
        kill(worker)
    allowed = {**env, "VLSEARCH_FETCH_ALLOW": '["127.0.0.1"]'}
    worker = start_worker(allowed, tmp_path / "worker.log")
    try:
        job = json.loads(cli(allowed, "submit", "index", "--urls", str(listing), "-c", "photos", "--json").stdout)
        record = wait_for_end(allowed, job["id"], tmp_path)
        assert (record["state"], record["done"], record["failed"]) == ("done", 10, 2)
        failed = {str(error["source"]).rsplit("/", 1)[1]: error["error"] for error in record["errors"]}  # type: ignore[attr-defined]
        assert failed == {"broken.jpg": "CorruptImage", "missing.png": "FetchFailed"}
    finally:
        kill(worker)
    settings = Settings(data_dir=Path(env["VLSEARCH_DATA_DIR"]), collection="photos")
    with Service(settings) as service:
        records = list(service.store().scroll())
    assert sorted(record.payload["source_name"] for record in records) == sorted(urls[:8])


@pytest.mark.slow
def test_a_path_listing_indexes_the_files_it_names_and_lists_the_missing_ones(
    env: dict[str, str], worker: subprocess.Popen[bytes], image_folder: Path, tmp_path: Path
) -> None:
    listing = image_folder / "list.txt"
    listing.write_text(
        "trip/img1.png\n# a comment\n\nhome/img5.png\n" + f"{image_folder / 'trip' / 'img2.png'}\n"
        "trip/gone.png\ntrip/img1.png\n"
    )
    job = json.loads(cli(env, "submit", "index", "--paths", str(listing), "-c", "photos", "--json").stdout)
    assert job["total"] == 4  # each path once
    record = wait_for_end(env, job["id"], tmp_path)
    assert (record["state"], record["done"], record["failed"]) == ("done", 4, 1)
    [error] = record["errors"]  # type: ignore[misc]
    assert (error["source"], error["error"]) == (str(image_folder / "trip" / "gone.png"), "FileNotFound")
    check_collection(env, 3)
    both = cli(env, "submit", "index", str(image_folder), "--paths", str(listing))
    assert both.returncode != 0 and "one of them" in both.stderr


@pytest.mark.parametrize("concurrency", [1, 2])
def test_each_pool_child_runs_torch_on_its_share_of_the_cores(
    env: dict[str, str], tmp_path: Path, concurrency: int
) -> None:
    from workers.app import available_cores, threads_per_child

    assert threads_per_child(16, 4) == 4 and threads_per_child(2, 4) == 1 and threads_per_child(8, None) == 1
    folder = tmp_path / "threads"
    folder.mkdir()
    env = {**env, "VLSEARCH_TEST_THREADS_DIR": str(folder)}
    env.pop("OMP_NUM_THREADS")
    worker = start_worker(
        env, tmp_path / "worker.log", concurrency=concurrency, include=["tests.workers.report_threads"]
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.iterdir())) < concurrency and time.monotonic() < deadline:
            time.sleep(0.2)
        reported = [int(path.read_text()) for path in folder.iterdir()]
    finally:
        kill(worker)
    assert reported == [max(1, available_cores() // concurrency)] * concurrency
