"""One FAISS collection shared by several real processes (an API, workers, a CLI): creation races, concurrent
writers and a reader, merged payload updates from two processes, fork, and the bounded, typed waits.

Every process here is a real `python -c` child on the same files; nothing is simulated. Each child script
reports through its exit code and stdout, and each run is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic_vectors import isotropic
from retriever.errors import CollectionClosed, SaveFailed, StoreBusy
from retriever.faiss_store import INDEX_FILE, FaissStore
from retriever.store import Manifest, PayloadUpdate

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 16
CHILD_TIMEOUT = 120


def manifest(index_type: str = "flat") -> Manifest:
    return Manifest(encoder="test-encoder", weights="untrained", dim=DIM, index_type=index_type)


def start(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    try:
        out, err = process.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, err[-3000:]
    return out


def vectors_for(ids: list[str]) -> np.ndarray:
    """The same vector for an id in every process: seeded by the id."""
    return np.concatenate([isotropic(1, DIM, seed=int.from_bytes(i.encode()[-6:], "big")) for i in ids])


PRELUDE = """
import sys, time, json
from pathlib import Path
import numpy as np
from bench.synthetic_vectors import isotropic
from retriever.faiss_store import FaissStore
from retriever.store import Manifest, PayloadUpdate

def vectors_for(ids):
    return np.concatenate([isotropic(1, 16, seed=int.from_bytes(i.encode()[-6:], "big")) for i in ids])

def wait_for(path):
    deadline = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
"""


# --- creating one collection from two processes at once ---------------------------------------------------

CREATOR = (
    PRELUDE
    + """
directory, go, name, index_type = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
manifest = Manifest(encoder="test-encoder", weights="untrained", dim=16, index_type=index_type)
wait_for(go)
store = FaissStore.open(directory, manifest)
for batch in range(10):
    ids = [f"{name}-{batch}-{j}" for j in range(20)]
    store.upsert(ids, vectors_for(ids), [{"paths": [f"/{name}/{i}.jpg"]} for i in ids])
store.save()
store.close()
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_two_processes_creating_one_new_collection_at_once_keep_every_point(
    tmp_path: Path, index_type: str
) -> None:
    for attempt in range(3):  # three races: each must keep everything
        directory, go = tmp_path / f"c{attempt}", tmp_path / f"go{attempt}"
        creators = [start(CREATOR, directory, go, name, index_type) for name in ("a", "b")]
        time.sleep(1.0)  # both imported and waiting
        go.touch()
        for creator in creators:
            finish(creator)
        store = FaissStore.open(directory)
        expected = {f"{name}-{batch}-{j}" for name in "ab" for batch in range(10) for j in range(20)}
        assert store.count() == 400 == store.index_info().indexed
        assert {record.id for record in store.scroll()} == expected
        store.close()


# --- two writers and a reader ------------------------------------------------------------------------------

BASE = [f"base-{i}" for i in range(60)]

WRITER = (
    PRELUDE
    + """
directory, go, name, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
wait_for(go)
store = FaissStore.open(directory)
base = [f"base-{i}" for i in range(60)]
for r in range(rounds):
    ids = [f"{name}-{r}-{j}" for j in range(8)]
    store.upsert(ids, vectors_for(ids), [{"paths": [f"/{name}/{r}/{j}.jpg"], "round": r} for j in range(8)])
    # merges on the same base points as the other writer: paths, tags, captions, plain fields
    updates = {
        point: PayloadUpdate(
            add={"paths": (f"/{name}/{r}/{point}.jpg",), "tags": (f"{name}-tag-{r}",)},
            captions={f"{name}-model-{r}": f"{name} saw {point} in round {r}"},
            set={f"{name}_last_round": r},
        )
        for point in base[r % 3 :: 3]
    }
    assert len(store.update_payloads(updates)) == len(updates)
    store.delete([ids[0]])
    if r % 5 == 4:
        store.save()
store.save()
store.close()
"""
)

READER = (
    PRELUDE
    + """
directory, go, done = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = FaissStore.open(directory)
rng = np.random.default_rng(1)
wait_for(go)
searches = 0
while not Path(done).exists():
    query = isotropic(1, 16, seed=int(rng.integers(1 << 30)))[0]
    hits = store.search(query, k=10)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len({h.id for h in hits}) == len(hits)  # never a duplicate
    store.count()
    store.keyword_search("base", k=5)
    store.get(["base-1", "base-2"])
    searches += 1
print(searches)
store.close()
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_two_writers_and_a_reader_lose_nothing_and_the_index_agrees_with_sqlite(
    tmp_path: Path, index_type: str
) -> None:
    directory, go, done, rounds = tmp_path / "c", tmp_path / "go", tmp_path / "done", 15
    store = FaissStore.open(directory, manifest(index_type))
    store.upsert(BASE, vectors_for(BASE), [{"paths": [f"/base/{point}.jpg"]} for point in BASE])
    store.close()

    reader = start(READER, directory, go, done)
    writers = [start(WRITER, directory, go, name, rounds) for name in ("w1", "w2")]
    time.sleep(1.0)
    go.touch()
    for writer in writers:
        finish(writer)
    done.touch()
    assert int(finish(reader)) > 0  # it searched while they wrote, and never raised

    store = FaissStore.open(directory)
    created = {f"{name}-{r}-{j}" for name in ("w1", "w2") for r in range(rounds) for j in range(1, 8)}
    assert {record.id for record in store.scroll()} == created | set(BASE)
    assert store.count() == len(created) + len(BASE) == store.index_info().indexed
    for record in store.get(BASE):
        i = BASE.index(record.id)
        rounds_of_point = [r for r in range(rounds) if i % 3 == r % 3]
        for name in ("w1", "w2"):  # every field each writer merged is there: none replaced the other's
            assert {f"/{name}/{r}/{record.id}.jpg" for r in rounds_of_point} <= set(record.payload["paths"])
            assert {f"{name}-tag-{r}" for r in rounds_of_point} <= set(record.payload["tags"])
            assert {f"{name}-model-{r}" for r in rounds_of_point} <= set(record.payload["captions"])
            assert record.payload[f"{name}_last_round"] == rounds_of_point[-1]
        assert record.payload["paths"][0] == f"/base/{record.id}.jpg"
        assert len(record.payload["paths"]) == 1 + 2 * len(rounds_of_point)  # no duplicate
    # the reopened index holds exactly SQLite's points: each one is its own best hit
    sample = sorted(created)[::5] + BASE[::5]
    found = [store.search(vector, k=1)[0].id for vector in vectors_for(sample)]
    assert found == sample
    store.close()


# --- merged payload updates from two processes on one point ------------------------------------------------

MERGER = (
    PRELUDE
    + """
directory, go, kind, target = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
wait_for(go)
store = FaissStore.open(directory)
for i in range(40):
    if kind == "caption":
        update = PayloadUpdate(captions={f"model-{i}": f"caption {i}"})
    else:
        update = PayloadUpdate(add={"paths": (f"/copies/{i}.jpg",)})
    store.update_payloads({target: update})
store.close()
"""
)


@pytest.mark.slow
def test_captions_and_paths_written_by_two_processes_on_one_point_are_all_kept(tmp_path: Path) -> None:
    directory, go, target = tmp_path / "c", tmp_path / "go", "the-image"
    store = FaissStore.open(directory, manifest())
    store.upsert([target], vectors_for([target]), [{"paths": ["/original.jpg"], "width": 10}])
    store.close()
    mergers = [start(MERGER, directory, go, kind, target) for kind in ("caption", "path")]
    time.sleep(1.0)
    go.touch()
    for merger in mergers:
        finish(merger)
    store = FaissStore.open(directory)
    [record] = store.get([target])
    assert record.payload["paths"] == ["/original.jpg", *(f"/copies/{i}.jpg" for i in range(40))]
    assert record.payload["captions"] == {f"model-{i}": f"caption {i}" for i in range(40)}
    assert record.payload["width"] == 10
    assert store.ids_by_path(["/copies/39.jpg", "/original.jpg"]) == {"/copies/39.jpg": target, "/original.jpg": target}
    store.close()


# --- fork ----------------------------------------------------------------------------------------------------


def test_a_store_opened_before_a_fork_is_reopened_in_the_child_and_the_parent_is_unaffected(tmp_path: Path) -> None:
    ids = [f"p-{i}" for i in range(50)]
    store = FaissStore.open(tmp_path / "c", manifest("hnsw"))
    store.upsert(ids, vectors_for(ids), [{"paths": [f"/{i}.jpg"]} for i in ids])
    assert store.search(vectors_for(ids[:1])[0], k=1)[0].id == ids[0]
    parent_db, parent_index = store._db, store._index
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            hit = store.search(vectors_for(ids[1:2])[0], k=1)[0].id
            child = ["c-0"]
            store.upsert(child, vectors_for(child), [{"paths": ["/child.jpg"]}])
            report = {
                "hit": hit,
                "own_db": store._db is not parent_db,
                "own_index": store._index is not parent_index,
                "count": store.count(),
            }
            store.close()
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"hit": ids[1], "own_db": True, "own_index": True, "count": 51}
    # the parent's store is its own, still open, and sees the child's commit
    assert store._db is parent_db
    assert store.search(vectors_for(["c-0"])[0], k=1)[0].id == "c-0"
    assert store.count() == 51
    store.close()


# --- bounded waits and typed errors -------------------------------------------------------------------------

LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE meta SET value = value WHERE key = 'generation'")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def test_while_another_process_holds_the_write_lock_readers_go_on_and_writers_fail_typed(tmp_path: Path) -> None:
    ids = [f"p-{i}" for i in range(30)]
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(ids, vectors_for(ids), [{"paths": [f"/{i}.jpg"]} for i in ids])
    store.close()
    holder = start(LOCK_HOLDER, tmp_path / "c" / "payloads.sqlite", 20)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        began = time.monotonic()
        reader = FaissStore.open(tmp_path / "c", lock_timeout=0.3)  # opening only reads
        assert reader.search(vectors_for(ids[:1])[0], k=1)[0].id == ids[0]
        assert reader.count() == 30 and reader.ids_by_path(["/p-3.jpg"]) == {"/p-3.jpg": "p-3"}
        with pytest.raises(StoreBusy, match="VLSEARCH_LOCK_TIMEOUT"):
            reader.update_payloads({ids[0]: PayloadUpdate(set={"x": 1})})
        with pytest.raises(StoreBusy, match="VLSEARCH_LOCK_TIMEOUT"):
            reader.upsert(["new"], vectors_for(["new"]), [{}])
        assert time.monotonic() - began < 10  # bounded by the timeout, not by the holder's 20 s
        reader.close()  # nothing to save: it only read
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = FaissStore.open(tmp_path / "c")
    assert store.count() == 30 and "x" not in store.get([ids[0]])[0].payload  # the failed writes left nothing
    store.close()


def test_a_reader_waits_for_this_process_s_index_update_at_most_the_lock_timeout(tmp_path: Path) -> None:
    ids = [f"p-{i}" for i in range(10)]
    store = FaissStore.open(tmp_path / "c", manifest(), lock_timeout=0.2)
    store.upsert(ids, vectors_for(ids), [{} for _ in ids])
    holding, release = threading.Event(), threading.Event()

    def hold_the_index() -> None:
        with store._lock.write():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_index)
    holder.start()
    holding.wait(5)
    try:
        with pytest.raises(StoreBusy):
            store.search(vectors_for(ids[:1])[0], k=1)
    finally:
        release.set()
        holder.join()
    assert store.search(vectors_for(ids[:1])[0], k=1)[0].id == ids[0]
    store.close()


def test_a_closed_store_and_a_failed_save_are_typed_errors(tmp_path: Path) -> None:
    ids = [f"p-{i}" for i in range(10)]
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(ids, vectors_for(ids), [{} for _ in ids])
    # the index file's place taken by a non-empty folder: the rename fails as a full or broken disk would
    blocker = tmp_path / "c" / INDEX_FILE
    blocker.mkdir()
    (blocker / "x").write_text("in the way")
    with pytest.raises(SaveFailed, match="nothing committed is lost"):
        store.save()
    (blocker / "x").unlink()
    blocker.rmdir()
    assert store.save() is True
    store.close()
    with pytest.raises(CollectionClosed):
        store.search(vectors_for(ids[:1])[0], k=1)
    with pytest.raises(CollectionClosed):
        store.upsert(["q"], vectors_for(["q"]), [{}])
    reopened = FaissStore.open(tmp_path / "c")
    assert reopened.count() == 10
    reopened.close()


def test_a_raw_sqlite_error_never_reaches_the_caller(tmp_path: Path) -> None:
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(["a"], vectors_for(["a"]), [{}])
    store.close()
    conn = sqlite3.connect(tmp_path / "c" / "payloads.sqlite", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")  # not even readers may read now (a rollback journal would do the same)
    conn.execute("PRAGMA journal_mode")
    try:
        with pytest.raises(StoreBusy):
            store = FaissStore.open(tmp_path / "c", lock_timeout=0.2)
            store.upsert(["b"], vectors_for(["b"]), [{}])
    finally:
        conn.execute("ROLLBACK")
        conn.close()
