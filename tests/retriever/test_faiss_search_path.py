"""The FAISS store's search fast path: the narrow HNSW pool, the commit watch and what it lets a search keep
(the generation and a cache of points), the read lock, the query check.

Each shortcut must answer exactly as the slow way it skips: the narrow pool as the full one, and a search after
any commit (through the store, through another store on the same files, or by another process) as a search
that read SQLite.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.synthetic_vectors import isotropic
from retriever import faiss_store, payload_db
from retriever.errors import InvalidQuery
from retriever.faiss_store import FaissStore, _HnswIndex, _ReadWriteLock
from retriever.payload_db import CommitWatch
from retriever.store import Filter, Hit, Manifest
from tests.retriever.test_store_contract import make_points

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def manifest(index_type: str = "hnsw", dim: int = DIM) -> Manifest:
    return Manifest(encoder="test-encoder", weights="untrained", dim=dim, index_type=index_type)


def as_tuples(hits: list[Hit]) -> list[tuple[str, float, Any]]:
    return [(hit.id, hit.score, hit.payload) for hit in hits]


@pytest.fixture(params=["watch", "no-watch"])
def commit_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the WAL-index commit watch, and again without it (SQLite read by every search)."""
    if request.param == "no-watch":
        monkeypatch.setattr(CommitWatch, "open", classmethod(lambda cls, path: None))
    return str(request.param)


# --- the narrow HNSW pool ----------------------------------------------------------------------------------


def test_the_narrow_hnsw_pool_answers_exactly_as_the_full_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same ids, scores, order and payloads with and without the narrow pool, through ties across the cut,
    tombstones, a filter searched in the graph, pages, and k past efSearch (no narrow pool)."""
    points = make_points(3000, dim=DIM, seed=30)
    store = FaissStore.open(tmp_path / "c", manifest(), hnsw_ef_search=40)
    store.upsert(points.ids, points.vectors, points.payloads)
    queries = isotropic(40, DIM, seed=31)
    # 15 copies of one vector, inserted against id order: a query at it ties across the cut of k=10
    twins = [f"twin-{i:02d}" for i in reversed(range(15))]
    store.upsert(twins, np.tile(queries[0], (15, 1)), [{"tags": ["twin"]} for _ in twins])
    # and two groups of 4 copies, tied among themselves inside the top 10 of a query at them; inserted in
    # and against id order, so that one comes out of faiss (ties in fid order, one way or the other) unsorted
    quads = [[f"quad{group}-{i}" for i in order] for group, order in enumerate([range(4), reversed(range(4))])]
    for group, quad in enumerate(quads):
        store.upsert(quad, np.tile(queries[1 + group], (4, 1)), [{"tags": ["quad"]} for _ in quad])
    store.delete(points.ids[:100])  # tombstones, excluded by the default selector
    assert store.index_info().tombstones == 100
    broad = Filter(path_prefix="/photos/")  # about 2/3 of the points: searched in the graph, not scanned
    cases = [(10, 0, None), (1, 0, None), (5, 5, None), (3, 20, None), (39, 0, None), (45, 0, None)]
    cases += [(10, 0, broad), (4, 8, broad)]

    decisive = {"yes": 0, "no": 0}
    narrow_top = FaissStore._narrow_top

    def counted(self: FaissStore, query: np.ndarray, need: int, selector: Any) -> Any:
        ranked = narrow_top(self, query, need, selector)
        if self._index.narrow_pool(need) is not None:
            decisive["yes" if ranked is not None else "no"] += 1
        return ranked

    monkeypatch.setattr(FaissStore, "_narrow_top", counted)
    narrow = [[store.search(q, k, filter=f, offset=o) for q in queries] for k, o, f in cases]
    monkeypatch.setattr(_HnswIndex, "narrow_pool", lambda self, need: None)
    full = [[store.search(q, k, filter=f, offset=o) for q in queries] for k, o, f in cases]

    for case, narrow_hits, full_hits in zip(cases, narrow, full, strict=True):
        assert [as_tuples(h) for h in narrow_hits] == [as_tuples(h) for h in full_hits], case
    assert [hit.id for hit in full[0][0]] == sorted(twins)[:10]  # the tie went by id
    for group, quad in enumerate(quads):  # so did these, within the narrow pool
        assert [hit.id for hit in narrow[0][1 + group][:4]] == sorted(quad)
    assert decisive["yes"] > 100 and decisive["no"] >= 1  # both ways were taken
    store.close()


def test_a_search_of_an_empty_or_fully_deleted_hnsw_collection_returns_nothing(tmp_path: Path) -> None:
    store = FaissStore.open(tmp_path / "c", manifest())
    query = isotropic(1, DIM, seed=32)[0]
    assert store.search(query, k=10) == []
    points = make_points(5, dim=DIM, seed=33)
    store.upsert(points.ids, points.vectors, points.payloads)
    assert {hit.id for hit in store.search(query, k=10)} == set(points.ids)  # fewer than k: all of them
    store.delete(points.ids)
    assert store.search(query, k=10) == []
    store.close()


# --- searches after commits --------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_searches_follow_every_write_through_the_store(tmp_path: Path, index_type: str) -> None:
    points = make_points(200, dim=DIM, seed=34)
    store = FaissStore.open(tmp_path / "c", manifest(index_type))
    store.upsert(points.ids, points.vectors, points.payloads)
    query, target = points.vectors[7], points.ids[7]
    assert store.search(query, k=1)[0].payload == points.payloads[7]  # now cached

    store.set_payload(target, {"tags": ["renamed"]})
    assert store.search(query, k=1)[0].payload == {"tags": ["renamed"]}
    store.upsert([target], query[None, :], [{"tags": ["same vector"]}])  # keeps its fid: payload only
    assert store.search(query, k=1)[0].payload == {"tags": ["same vector"]}
    store.upsert([target], points.vectors[8][None, :], [{"tags": ["moved"]}])
    tied = {hit.id: hit.payload for hit in store.search(points.vectors[8], k=2)}  # the same vector twice
    assert tied == {target: {"tags": ["moved"]}, points.ids[8]: points.payloads[8]}
    store.delete([target])
    assert target not in [hit.id for hit in store.search(points.vectors[8], k=5)]
    store.close()


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_searches_follow_writes_through_another_store_on_the_same_files(
    tmp_path: Path, index_type: str, commit_check: str
) -> None:
    """Payload-only changes leave the generation alone; deletes move it, and the reader must catch up."""
    points = make_points(200, dim=DIM, seed=35)
    reader = FaissStore.open(tmp_path / "c", manifest(index_type))
    reader.upsert(points.ids, points.vectors, points.payloads)
    writer = FaissStore.open(tmp_path / "c")
    assert (reader._db._commits is None) == (commit_check == "no-watch")
    query, target = points.vectors[3], points.ids[3]
    worded = {"paths": ["/photos/zebra.jpg"]}
    for step in range(3):  # each time right after a search by the reader: the point is cached
        assert reader.search(query, k=1)[0].id == target
        if step == 0:
            writer.set_payload(target, worded)
            assert reader.search(query, k=1)[0].payload == worded
            [hit] = reader.keyword_search("zebra", k=1)
            assert (hit.id, hit.payload) == (target, worded)
            [filtered] = reader.search(query, k=1, filter=Filter(path_prefix="/photos/zebra"))
            assert (filtered.id, filtered.payload) == (target, worded)
        elif step == 1:
            writer.upsert([target], query[None, :], [{"tags": ["same vector"]}])
            assert reader.search(query, k=1)[0].payload == {"tags": ["same vector"]}
        else:
            writer.delete([target])
            assert target not in [hit.id for hit in reader.search(query, k=5)]
    writer.close()
    reader.close()


WRITER_CHILD = """
import sys
from pathlib import Path
from retriever.faiss_store import FaissStore

store = FaissStore.open(Path(sys.argv[1]))
store.set_payload(sys.argv[2], {"tags": ["from another process"]})
store.delete([sys.argv[3]])
store.close()
"""


def test_searches_follow_changes_made_by_another_process(tmp_path: Path, commit_check: str) -> None:
    points = make_points(100, dim=DIM, seed=36)
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(points.ids, points.vectors, points.payloads)
    store.save()
    assert store.search(points.vectors[5], k=1)[0].payload == points.payloads[5]  # now cached
    assert store.search(points.vectors[6], k=1)[0].id == points.ids[6]
    subprocess.run(
        [sys.executable, "-c", WRITER_CHILD, str(tmp_path / "c"), points.ids[5], points.ids[6]],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
    )
    assert store.search(points.vectors[5], k=1)[0].payload == {"tags": ["from another process"]}
    assert points.ids[6] not in [hit.id for hit in store.search(points.vectors[6], k=5)]
    assert store.index_info().indexed == store.count() == 99
    store.close()


def test_a_reopened_store_reads_what_others_wrote_while_it_was_closed(tmp_path: Path) -> None:
    points = make_points(50, dim=DIM, seed=37)
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(points.ids, points.vectors, points.payloads)
    assert store.search(points.vectors[0], k=1)[0].payload == points.payloads[0]
    store.close()
    other = FaissStore.open(tmp_path / "c")
    other.set_payload(points.ids[0], {"tags": ["while closed"]})
    other.close()
    store = FaissStore.open(tmp_path / "c")
    assert store.search(points.vectors[0], k=1)[0].payload == {"tags": ["while closed"]}
    store.close()


def traced(store: FaissStore) -> list[str]:
    """The statements the store's search connection runs from now on."""
    statements: list[str] = []
    store._db._fresh_conn.set_trace_callback(statements.append)
    return statements


def test_after_a_commit_the_points_in_memory_read_only_the_rows_it_changed(tmp_path: Path) -> None:
    points = make_points(300, dim=DIM, seed=38)
    reader = FaissStore.open(tmp_path / "c", manifest("flat"))
    reader.upsert(points.ids[:299], points.vectors[:299], points.payloads[:299])
    assert reader.search(points.vectors[3], k=1)[0].id == points.ids[3]  # reads every point once
    statements = traced(reader)
    for query in points.vectors[:20]:
        reader.search(query, k=10)
    assert statements == []  # no commit: no SQLite at all
    writer = FaissStore.open(tmp_path / "c")
    writer.set_payload(points.ids[3], {"tags": ["renamed"]})
    writer.delete([points.ids[4]])
    writer.upsert(points.ids[299:], points.vectors[299:], points.payloads[299:])
    renamed_and_new = points.ids[3:300:296]
    changed = {fid for (fid,) in writer._db._conn.execute("SELECT fid FROM points WHERE id IN (?, ?)", renamed_and_new)}
    hits = reader.search(points.vectors[3], k=300)
    assert hits[0].payload == {"tags": ["renamed"]} and len(hits) == 299
    assert {hit.id for hit in hits} == set(points.ids) - {points.ids[4]}
    asked = [statement for statement in statements if "FROM points" in statement]
    assert len(asked) == 1 and "json_each" in asked[0]  # one read of the changed rows, not of every point
    fids = set(json.loads(asked[0].split("json_each('")[1].split("')")[0]))
    assert len(fids) == 3 and changed < fids  # the payload change, the new point and the deleted one
    writer.close()
    reader.close()


def test_a_copy_older_than_the_change_log_reads_every_point_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payload_db, "CHANGE_LOG_KEEP", 5)
    points = make_points(100, dim=DIM, seed=41)
    reader = FaissStore.open(tmp_path / "c", manifest("flat"))
    reader.upsert(points.ids, points.vectors, points.payloads)
    reader.search(points.vectors[0], k=1)
    writer = FaissStore.open(tmp_path / "c")
    for i in range(12):
        writer.set_payload(points.ids[i], {"tags": [f"version {i}"]})
    assert writer._db._conn.execute("SELECT count(*) FROM changes").fetchone()[0] <= 5  # the log stays bounded
    statements = traced(reader)
    hits = reader.search(points.vectors[7], k=100)
    assert hits[0].payload == {"tags": ["version 7"]} and len(hits) == 100
    assert {hit.id: hit.payload for hit in hits} == {
        **dict(zip(points.ids, points.payloads, strict=True)),
        **{points.ids[i]: {"tags": [f"version {i}"]} for i in range(12)},
    }
    assert any(statement.startswith("SELECT fid, id, payload FROM points") for statement in statements)
    writer.close()
    reader.close()


def test_a_collection_too_large_for_memory_reads_the_hits_from_sqlite(tmp_path: Path) -> None:
    points = make_points(50, dim=DIM, seed=42)
    store = FaissStore.open(tmp_path / "c", manifest("flat"), payload_cache_max_points=40)
    store.upsert(points.ids, points.vectors, points.payloads)
    for i in (0, 9, 31):
        assert as_tuples(store.search(points.vectors[i], k=1))[0][::2] == (points.ids[i], points.payloads[i])
    assert store._db._mirror is None
    store.delete(points.ids[:5])  # still 5 over: not even counted again
    statements = traced(store)
    assert store.search(points.vectors[31], k=1)[0].payload == points.payloads[31]
    assert not any("count(*)" in statement for statement in statements) and store._db._mirror is None
    store.delete(points.ids[5:10])  # down to the limit: kept in memory again
    assert store.search(points.vectors[31], k=1)[0].payload == points.payloads[31]
    assert store._db._mirror is not None and len(store._db._mirror) == 40
    store.close()


@pytest.mark.parametrize("change", ["move", "payload"])
def test_searches_from_many_threads_see_another_stores_commits_once_made(tmp_path: Path, change: str) -> None:
    """Readers search concurrently while another connection keeps moving a point, or changing its payload
    alone: a search that starts after a change has committed sees it, never what was there before."""
    points = make_points(200, dim=DIM, seed=40)
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(points.ids, points.vectors, points.payloads)
    writer = FaissStore.open(tmp_path / "c")
    started, committed = [0], [0]  # the last version whose upsert has started, and returned
    checked = [0]
    failures: list[BaseException] = []
    stop = threading.Event()
    places = isotropic(60, DIM, seed=43)

    def search_until_stopped() -> None:
        try:
            while not stop.is_set():
                before, version = started[0], committed[0]
                hits = store.search(places[version if change == "move" else 0], k=1)
                if before == version == started[0]:  # no move started during the search: none committed
                    assert [(hit.id, hit.payload) for hit in hits] == [("moving", {"version": version})]
                    checked[0] += 1
        except BaseException as failure:
            failures.append(failure)

    writer.upsert(["moving"], places[:1], [{"version": 0}])
    def count_until_stopped() -> None:  # statements of its own on the store's connection meanwhile
        try:
            while not stop.is_set():
                store.count(Filter(path_prefix="/photos/"))
        except BaseException as failure:
            failures.append(failure)

    readers = [threading.Thread(target=search_until_stopped) for _ in range(3)]
    readers.append(threading.Thread(target=count_until_stopped))
    for reader in readers:
        reader.start()
    for version in range(1, 60):
        started[0] = version
        if change == "move":
            writer.upsert(["moving"], places[version : version + 1], [{"version": version}])  # a new vector
        else:
            writer.set_payload("moving", {"version": version})
        committed[0] = version
        time.sleep(0.002)
    stop.set()
    for reader in readers:
        reader.join()
    assert failures == []
    assert checked[0] >= 30
    writer.close()
    store.close()


def test_a_catch_up_reads_the_change_log_and_vectors_from_one_snapshot(tmp_path: Path) -> None:
    """Another store deletes a point between the catch-up's first read and its read of the vectors: the
    catch-up still adds what its snapshot holds (never asking for a vector deleted meanwhile), and the next
    search catches up with the delete."""
    points = make_points(50, dim=DIM, seed=44)
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(points.ids[:40], points.vectors[:40], points.payloads[:40])
    writer = FaissStore.open(tmp_path / "c")
    writer.upsert(points.ids[40:], points.vectors[40:], points.payloads[40:])  # not yet in store's index
    read_sync_point = store._db.sync_point
    deleted: list[str] = []

    def delete_right_after_the_sync_point_is_read() -> Any:
        point = read_sync_point()
        if not deleted:
            deleted.append(points.ids[45])
            assert writer.delete(deleted) == 1  # committed while the catch-up's read is open
        return point

    store._db.sync_point = delete_right_after_the_sync_point_is_read  # type: ignore[method-assign]
    hits = store.search(points.vectors[45], k=50)
    assert deleted and store._index.live == 50  # the snapshot's view, taken before the delete
    assert len(hits) == 49 and points.ids[45] not in {hit.id for hit in hits}  # hits are read as of now
    hits = store.search(points.vectors[45], k=50)  # sees the delete's commit and catches up
    assert store._index.live == 49 and len(hits) == 49
    writer.close()
    store.close()


def test_a_catch_up_costs_what_changed_not_the_collection(tmp_path: Path) -> None:
    """After another store commits a few points, the reader's catch-up reads the change log and those
    points' vectors only: no statement reads every fid or vector of the collection."""
    points = make_points(400, dim=DIM, seed=45)
    small_ivf = {"ivf_nlist": 4, "pq_m": 4}  # trainable on 380 points
    for index_type in ("flat", "hnsw", "ivfpq"):
        directory = tmp_path / index_type
        reader = FaissStore.open(directory, manifest(index_type), **small_ivf)
        reader.upsert(points.ids[:380], points.vectors[:380], points.payloads[:380])
        assert reader._index.kind == index_type  # IVF-PQ trained by now
        assert reader.search(points.vectors[0], k=1)[0].id == points.ids[0]
        writer = FaissStore.open(directory, **small_ivf)
        writer.upsert(points.ids[380:], points.vectors[380:], points.payloads[380:])
        writer.delete(points.ids[:3])
        statements = traced(reader)
        reader._db._conn.set_trace_callback(statements.append)
        assert reader.search(points.vectors[390], k=1)[0].id == points.ids[390]
        assert points.ids[0] not in {hit.id for hit in reader.search(points.vectors[0], k=5)}
        every_fid = "SELECT fid FROM points WHERE 1 ORDER BY fid"  # what a reconcile by fid sets reads
        every_point = "SELECT fid, id, payload FROM points"  # a copy in memory read again in full
        assert not any(every_fid in statement or statement.strip() == every_point for statement in statements)
        assert not any("FROM vectors WHERE fid >" in statement for statement in statements)  # no rebuild
        assert any("FROM changes WHERE seq >" in statement for statement in statements)
        reader._db._conn.set_trace_callback(None)
        assert reader.index_info().indexed == reader.count() == 397
        writer.close()
        reader.close()


# --- the commit watch --------------------------------------------------------------------------------------


def test_the_commit_watch_changes_with_every_commit_and_only_then(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = sqlite3.connect(path, isolation_level=None)
    first.execute("PRAGMA journal_mode=WAL")
    first.execute("CREATE TABLE t (x INTEGER)")
    watch = CommitWatch.open(Path(f"{path}-shm"))
    assert watch is not None
    second = sqlite3.connect(path, isolation_level=None)
    seen = {watch.header()}
    for i in range(20):
        before = watch.header()
        second.execute("SELECT count(*) FROM t").fetchone()  # reads change nothing
        first.execute("SELECT count(*) FROM t").fetchone()
        assert watch.header() == before
        (first if i % 2 else second).execute("INSERT INTO t VALUES (?)", (i,))
        assert watch.header() not in seen
        seen.add(watch.header())
        if i == 10:
            second.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next commit restarts the WAL
    watch.close()
    first.close()
    second.close()


def test_the_commit_watch_is_left_out_where_there_is_no_wal_index(tmp_path: Path) -> None:
    assert CommitWatch.open(tmp_path / "missing-shm") is None
    (tmp_path / "short-shm").write_bytes(b"\0" * 10)
    assert CommitWatch.open(tmp_path / "short-shm") is None
    (tmp_path / "other-shm").write_bytes(b"\1" * 4096)  # not the header format the watch knows
    assert CommitWatch.open(tmp_path / "other-shm") is None
    path = tmp_path / "rollback.sqlite"
    connection = sqlite3.connect(path)  # rollback journal: no -shm file
    connection.execute("CREATE TABLE t (x INTEGER)")
    assert CommitWatch.open(Path(f"{path}-shm")) is None
    connection.close()


# --- queries and locks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_query_vectors_with_nan_or_inf_are_refused(tmp_path: Path, bad: float) -> None:
    store = FaissStore.open(tmp_path / "c", manifest("flat"))
    points = make_points(20, dim=DIM, seed=41)
    store.upsert(points.ids, points.vectors, points.payloads)
    query = points.vectors[0].copy()
    query[3] = bad
    with pytest.raises(InvalidQuery, match="NaN or infinite"):
        store.search(query, k=3)
    query[3], query[5] = np.inf, -np.inf
    with pytest.raises(InvalidQuery, match="NaN or infinite"):
        store.search(query, k=3)
    store.close()


def test_huge_finite_query_values_are_searched(tmp_path: Path) -> None:
    """1e20 squared overflows float32: a test of finiteness on the sum of squares would refuse it."""
    store = FaissStore.open(tmp_path / "c", manifest("flat"))
    points = make_points(20, dim=DIM, seed=42)
    store.upsert(points.ids, points.vectors, points.payloads)
    hits = store.search(points.vectors[4] * np.float32(1e20), k=3)
    assert [hit.id for hit in hits] == [hit.id for hit in store.search(points.vectors[4], k=3)]
    store.close()


def test_a_waiting_writer_holds_back_new_readers_until_it_is_done() -> None:
    lock = _ReadWriteLock()
    events: list[str] = []
    first_reader_in = threading.Event()
    release_first_reader = threading.Event()

    def first_reader() -> None:
        with lock.read():
            first_reader_in.set()
            release_first_reader.wait()
            events.append("first reader out")

    def writer() -> None:
        with lock.write():
            events.append("writer")

    def late_reader() -> None:
        with lock.read():
            events.append("late reader")

    threads = [threading.Thread(target=first_reader)]
    threads[0].start()
    first_reader_in.wait()
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    while not lock._writers_waiting:
        time.sleep(0.001)
    threads.append(threading.Thread(target=late_reader))
    threads[2].start()
    time.sleep(0.05)
    assert events == []  # the writer waits for the first reader; the late reader waits for the writer
    release_first_reader.set()
    for thread in threads:
        thread.join(timeout=5)
    assert events == ["first reader out", "writer", "late reader"]


def test_concurrent_hnsw_searches_with_tombstones_agree_with_one_at_a_time(tmp_path: Path) -> None:
    """With tombstones the default selector is set, and faiss's IndexIDMap swaps a wrapper of its own into the
    search parameters for the length of a search: threads sharing parameters would read each other's."""
    points = make_points(2000, dim=DIM, seed=44)
    store = FaissStore.open(tmp_path / "c", manifest())
    store.upsert(points.ids, points.vectors, points.payloads)
    store.delete(points.ids[:200])
    queries = isotropic(50, DIM, seed=45)
    expected = [as_tuples(store.search(query, k=10)) for query in queries]
    failures: list[BaseException] = []

    def search_all() -> None:
        try:
            for _ in range(20):
                for query, hits in zip(queries, expected, strict=True):
                    assert as_tuples(store.search(query, k=10)) == hits
        except BaseException as failure:
            failures.append(failure)

    threads = [threading.Thread(target=search_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    store.close()


# --- HNSW: other processes' vectors wait beside the graph ------------------------------------------------


def test_vectors_another_store_commits_are_searched_exactly_beside_the_graph_until_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader catching up with another store's commits does not insert into its graph in the search (about
    0.25 ms a vector); they wait beside it, searched exactly, and a background thread merges them once enough
    have come. Every search answers as if they were in the graph: found, filtered, deleted, never twice."""
    monkeypatch.setattr(faiss_store, "HNSW_MERGE_AT", 40)
    points = make_points(300, dim=DIM, seed=46)
    reader = FaissStore.open(tmp_path / "c", manifest("hnsw"))
    reader.upsert(points.ids[:200], points.vectors[:200], points.payloads[:200])
    writer = FaissStore.open(tmp_path / "c")
    writer.upsert(points.ids[200:230], points.vectors[200:230], points.payloads[200:230])
    assert reader.search(points.vectors[210], k=1)[0].id == points.ids[210]
    index = reader._index
    assert isinstance(index, _HnswIndex) and index.pending == 30 and index.index.ntotal == 200
    for i in (205, 229):
        assert reader.search(points.vectors[i], k=1)[0].id == points.ids[i]
    tagged = Filter(tags_any=("cat",))
    expected = [i for i in range(230) if "cat" in points.payloads[i].get("tags", [])]
    hits = reader.search(points.vectors[205], k=230, filter=tagged)
    assert sorted(hit.id for hit in hits) == sorted(points.ids[i] for i in expected)
    writer.delete([points.ids[205]])  # a pending point deleted: dropped, not a tombstone
    assert points.ids[205] not in {hit.id for hit in reader.search(points.vectors[205], k=10)}
    assert index.pending == 29 and index.tombstones == 0
    writer.upsert(points.ids[230:260], points.vectors[230:260], points.payloads[230:260])  # past the mark: merged
    assert reader.search(points.vectors[250], k=1)[0].id == points.ids[250]
    merger = reader._merger
    if merger is not None:
        merger.join(10)
    assert index.pending == 0 and index.index.ntotal == 259
    hits = reader.search(points.vectors[250], k=259)
    assert len(hits) == len({hit.id for hit in hits}) == 259
    assert reader.index_info().indexed == reader.count() == 259
    writer.close()
    reader.close()
