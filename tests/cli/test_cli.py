"""The `vlsearch` command end to end on a tiny model (random weights: bookkeeping and interfaces, not quality)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import run
from tests.conftest import TINY_MODEL


def test_index_then_search_returns_ranked_hits_as_json(cli_env: dict[str, str], image_folder: Path) -> None:
    report = run(cli_env, "index", str(image_folder), "--json")
    assert (report["added"], report["count"], report["failed"]) == (8, 8, [])
    hits = run(cli_env, "search", "a red circle", "--k", "5", "--json")
    assert len(hits) == 5
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(hit["path"]).is_file() for hit in hits)


def test_search_pages_concatenate_to_the_full_ranking(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    full = [h["id"] for h in run(cli_env, "search", "blue", "--k", "8", "--json")]
    pages = [
        h["id"]
        for offset in (0, 3, 6)
        for h in run(cli_env, "search", "blue", "--k", "3", "--offset", str(offset), "--json")
    ]
    assert pages == full


def test_search_filters_and_min_score(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    trip = run(cli_env, "search", "x", "--k", "8", "--path-prefix", str(image_folder / "trip"), "--json")
    assert len(trip) == 4 and all(h["path"].startswith(str(image_folder / "trip")) for h in trip)
    wide = run(cli_env, "search", "x", "--k", "8", "--min-width", "150", "--json")
    assert len(wide) == 4 and all(h["width"] == 160 for h in wide)
    scores = [h["score"] for h in run(cli_env, "search", "x", "--k", "8", "--json")]
    cut = (scores[2] + scores[3]) / 2
    assert len(run(cli_env, "search", "x", "--k", "8", "--min-score", str(cut), "--json")) == 3


def test_search_by_image_file_finds_that_image_first(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    probe = image_folder / "home" / "img6.jpg"
    hits = run(cli_env, "search", "--image", str(probe), "--k", "3", "--json")
    assert hits[0]["path"] == str(probe) and hits[0]["score"] > 0.999


def test_similar_by_id_excludes_the_image_itself(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    first = run(cli_env, "search", "--image", str(image_folder / "home" / "img6.jpg"), "--k", "1", "--json")[0]
    hits = run(cli_env, "similar", first["id"], "--k", "7", "--json")
    assert len(hits) == 7 and first["id"] not in {h["id"] for h in hits}


def test_info_shows_manifest_and_count(cli_env: dict[str, str], image_folder: Path, tiny_checkpoint: Path) -> None:
    run(cli_env, "index", str(image_folder), "--collection", "trip", "--json")
    info = run(cli_env, "info", "--collection", "trip", "--json")
    assert info["count"] == 8
    assert info["manifest"]["encoder"] == TINY_MODEL
    assert info["manifest"]["weights"].startswith("sha256:")
    assert info["manifest"]["dim"] == 64 and info["manifest"]["index_type"] == "flat"


def test_delete_by_path_and_by_id_and_drop(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    assert run(cli_env, "delete", str(image_folder / "trip" / "img0.jpg"), "--json")["count"] == 7
    some_id = run(cli_env, "search", "x", "--k", "1", "--json")[0]["id"]
    assert run(cli_env, "delete", some_id, "--json") == {"collection": "default", "deleted": 1, "count": 6}
    assert run(cli_env, "delete", "--drop", "--json")["dropped"] is True
    result = run(cli_env, "search", "x", ok=False)
    assert result.exit_code == 1 and "no collection 'default'" in result.output


def test_dupes_groups_a_near_copy_and_an_exact_copy(cli_env: dict[str, str], image_folder: Path) -> None:
    from PIL import Image

    source = image_folder / "home" / "img4.png"
    Image.open(source).save(image_folder / "img4-recompressed.jpg", quality=95)  # near-duplicate: other bytes
    (image_folder / "img7-copy.png").write_bytes((image_folder / "home" / "img7.png").read_bytes())
    run(cli_env, "index", str(image_folder), "--json")
    groups = run(cli_env, "dupes", "--threshold", "0.995", "--json")
    as_names = [sorted(Path(p).name for member in group for p in member["paths"]) for group in groups]
    assert ["img4-recompressed.jpg", "img4.png"] in as_names
    assert ["img7-copy.png", "img7.png"] in as_names


def test_other_encoder_is_refused_with_one_line_error(
    cli_env: dict[str, str], image_folder: Path, other_checkpoint: Path
) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    result = run(cli_env, "search", "x", "--pretrained", str(other_checkpoint), ok=False)
    assert result.exit_code == 1
    assert "collection was built with encoder" in result.output and "Traceback" not in result.output


def test_console_script_reports_errors_on_one_line_and_exits_non_zero(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **cli_env}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "index", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no such file or folder" in result.stderr


def test_reindexing_keeps_the_index_type_unless_one_is_named(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--index-type", "hnsw", "--json")
    run(cli_env, "index", str(image_folder), "--json")
    assert run(cli_env, "info", "--collection", "default", "--json")["manifest"]["index_type"] == "hnsw"
    run(cli_env, "index", str(image_folder), "--index-type", "flat", "--json")
    assert run(cli_env, "info", "--collection", "default", "--json")["manifest"]["index_type"] == "flat"
