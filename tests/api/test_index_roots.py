"""VLSEARCH_INDEX_ROOTS against a real server (jobs on Redis database 9, no worker: the API's check is the point):
an index job's paths and a tag job's labels_file must lie in one of the folders it names, links resolved; anything
else on the server is a 403 that says nothing about the path."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import REDIS_URL, Keys, Server, Template, copy_data, error_of, start_server, stop_server


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, template: Template) -> tuple[Path, Path]:
    """A photo root holding the template's scenes, a labels file and a link leading out; and a folder outside it."""
    base = tmp_path_factory.mktemp("roots")
    root, outside = base / "photos", base / "private"
    root.mkdir()
    outside.mkdir()
    for scene in sorted(template.scenes.iterdir())[:3]:
        (root / scene.name).write_bytes(scene.read_bytes())
    (root / "labels.txt").write_text("circle\nsquare\n")
    (outside / "secret.png").write_bytes(next(template.scenes.iterdir()).read_bytes())
    (outside / "labels.txt").write_text("circle\n")
    os.symlink(outside, root / "way-out")
    return root, outside


@pytest.fixture(scope="module")
def writer(
    roots: tuple[Path, Path], template: Template, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator:
    base = tmp_path_factory.mktemp("roots-server")
    server: Server = start_server(
        copy_data(template, base / "data"),
        base / "server.log",
        redis_url=REDIS_URL,
        index_roots=json.dumps([str(roots[0])]),
    )
    try:
        with server.client(keys.write) as client:
            yield client
    finally:
        stop_server(server)


def test_paths_inside_a_root_are_indexed(writer, roots: tuple[Path, Path], created_jobs: list[str]) -> None:
    root, _ = roots
    totals = []
    for paths in ([str(root)], [str(root / "00000.png")], [f"{root}/../{root.name}"]):
        response = writer.post("/v1/jobs", json={"kind": "index", "collection": "rooted", "paths": paths})
        assert response.status_code == 202, response.text
        created_jobs.append(response.json()["id"])
        totals.append(response.json()["total"])
    assert totals == [3, 1, 3]  # the root's three images (its link to a folder outside is not walked)
    tag = writer.post("/v1/jobs", json={"kind": "tag", "collection": "shapes", "labels_file": str(root / "labels.txt")})
    assert tag.status_code == 202, tag.text
    created_jobs.append(tag.json()["id"])


@pytest.mark.parametrize(
    "path",
    ["/etc", "/etc/passwd", "/no/such/place", "{outside}/secret.png", "{root}/../private", "{root}/way-out",
     "{root}/way-out/secret.png", "{root}-sibling", "relative/path"],
)  # fmt: skip
def test_paths_outside_every_root_are_403_whether_they_exist_or_not(
    writer, roots: tuple[Path, Path], path: str
) -> None:
    root, outside = roots
    name = path.format(root=root, outside=outside)
    response = writer.post("/v1/jobs", json={"kind": "index", "collection": "rooted", "paths": [str(root), name]})
    assert response.status_code == 403, response.text
    error = error_of(response)
    assert error["code"] == "path_not_allowed" and "VLSEARCH_INDEX_ROOTS" in error["message"]
    assert "no such" not in error["message"]  # nothing said of what lies outside


def test_a_labels_file_outside_every_root_is_403(writer, roots: tuple[Path, Path]) -> None:
    _, outside = roots
    for name in (str(outside / "labels.txt"), "/dev/zero", "/etc/hostname"):
        response = writer.post("/v1/jobs", json={"kind": "tag", "collection": "shapes", "labels_file": name})
        assert response.status_code == 403, response.text
        assert error_of(response)["code"] == "path_not_allowed"
    nul = writer.post("/v1/jobs", json={"kind": "index", "paths": ["a\u0000b"]})
    assert nul.status_code == 400 and error_of(nul)["code"] == "invalid_query"
