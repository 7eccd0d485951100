"""Searches while another process writes to the same collection: no 5xx, counts only grow, hits stay consistent."""

from __future__ import annotations

import threading
from pathlib import Path

from core.service import Service
from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import Keys, Server


def test_searches_during_a_write_see_a_consistent_collection(
    server: Server, keys: Keys, server_service: Service, tmp_path: Path
) -> None:
    first, more = tmp_path / "first", tmp_path / "more"
    write_collection(generate_scenes("test", 4, seed=41), first, size=64)
    write_collection(generate_scenes("test", 24, seed=42), more, size=64)
    assert server_service.index([first], "growing").count == 4
    files = sorted(more.glob("*.png"))
    failures: list[BaseException] = []

    def write() -> None:  # a writer in this process, in batches, while the server answers searches
        try:
            for start in range(0, len(files), 4):
                server_service.index(files[start : start + 4], "growing", batch_size=4)
        except BaseException as error:
            failures.append(error)

    writer = threading.Thread(target=write)
    counts: list[int] = []
    with server.client(keys.read) as client:
        writer.start()
        while writer.is_alive() or len(counts) < 3:
            search = client.post("/v1/search", json={"text": "a red circle", "collection": "growing", "k": 30})
            info = client.get("/v1/collections/growing")
            assert search.status_code == 200 and info.status_code == 200, (search.text, info.text)
            hits = search.json()["hits"]
            assert len({hit["id"] for hit in hits}) == len(hits) and len(hits) <= 28
            counts.append(info.json()["count"])
        writer.join()
        final = client.get("/v1/collections/growing").json()["count"]
    assert not failures, failures
    assert counts == sorted(counts) and counts[0] >= 4 and final == 28, counts
    with server.client(keys.write) as client:
        assert client.delete("/v1/collections/growing").status_code == 200


def test_concurrent_requests_of_every_kind_are_answered(server: Server, keys: Keys, image_ids: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    requests = [
        ("POST", "/v1/search", {"json": {"text": "a red circle", "k": 5}}),
        ("POST", "/v1/search", {"json": {"image_id": image_ids[2], "k": 5}}),
        ("GET", f"/v1/collections/shapes/images/{image_ids[3]}/similar", {}),
        ("GET", f"/v1/collections/shapes/images/{image_ids[4]}/thumbnail", {"params": {"size": 48}}),
        ("GET", "/v1/collections/shapes", {}),
    ] * 8
    with server.client(keys.read) as client, ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda r: client.request(r[0], r[1], **r[2]).status_code, requests))
    assert statuses == [200] * len(requests)
