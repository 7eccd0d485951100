"""`vlsearch search --mode`, the Qdrant store chosen by settings, and `vlsearch migrate` (tiny random model)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.cli.conftest import run


@pytest.fixture
def lisbon_folder(image_folder: Path) -> Path:
    """The image folder, its four "trip" images moved under a folder named after the trip."""
    (image_folder / "trip").rename(image_folder / "2019_Lisbon-trip")
    return image_folder


@pytest.fixture
def qdrant_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**cli_env, "VLSEARCH_STORE": "qdrant", "VLSEARCH_QDRANT_PATH": str(tmp_path / "qdrant")}


def is_lisbon(hit: dict[str, str]) -> bool:
    return "2019_Lisbon-trip" in hit["path"]


def test_keyword_and_hybrid_modes_find_images_by_the_words_of_their_folder(
    cli_env: dict[str, str], lisbon_folder: Path
) -> None:
    run(cli_env, "index", str(lisbon_folder), "--json")
    keyword = run(cli_env, "search", "Lisbon", "--mode", "keyword", "--k", "8", "--json")
    assert len(keyword) == 4 and all(is_lisbon(hit) for hit in keyword)
    # every image is in the CLIP ranking; the Lisbon ones are in the keyword ranking too, so they fuse first
    hybrid = run(cli_env, "search", "Lisbon", "--mode", "hybrid", "--k", "8", "--json")
    assert [is_lisbon(hit) for hit in hybrid] == [True] * 4 + [False] * 4
    assert len(run(cli_env, "search", "Lisbon", "--mode", "clip", "--k", "8", "--json")) == 8


def test_an_unknown_mode_is_refused_naming_the_choices(cli_env: dict[str, str], lisbon_folder: Path) -> None:
    result = run(cli_env, "search", "Lisbon", "--mode", "fuzzy", ok=False)
    assert result.exit_code != 0 and "clip" in result.output and "hybrid" in result.output


def test_the_qdrant_store_is_chosen_by_settings(
    qdrant_env: dict[str, str], lisbon_folder: Path, tmp_path: Path
) -> None:
    assert run(qdrant_env, "index", str(lisbon_folder), "--json")["count"] == 8
    assert (tmp_path / "qdrant" / "default").is_dir() and not (tmp_path / "data" / "collections").exists()
    info = run(qdrant_env, "info", "--json")
    assert info["count"] == 8 and info["manifest"]["store"] == "qdrant"
    keyword = run(qdrant_env, "search", "lisbon", "--mode", "keyword", "--k", "8", "--json")
    assert len(keyword) == 4 and all(is_lisbon(hit) for hit in keyword)
    assert run(qdrant_env, "delete", "--drop", "--json")["dropped"] is True
    assert not (tmp_path / "qdrant" / "default").exists()


def test_migrate_copies_a_faiss_collection_to_qdrant_that_answers_alike(
    cli_env: dict[str, str], qdrant_env: dict[str, str], lisbon_folder: Path
) -> None:
    run(cli_env, "index", str(lisbon_folder), "--json")
    report = run(qdrant_env, "migrate", "--from", "faiss", "--to", "qdrant", "--json")
    assert (report["copied"], report["source_count"], report["target_count"]) == (8, 8, 8)
    assert run(qdrant_env, "info", "--json")["manifest"]["store"] == "qdrant"
    for mode in ("clip", "keyword", "hybrid"):
        asked = ("search", "lisbon red", "--mode", mode, "--k", "8", "--json")
        faiss_hits, qdrant_hits = run(cli_env, *asked), run(qdrant_env, *asked)
        assert [h["id"] for h in qdrant_hits] == [h["id"] for h in faiss_hits], mode
        assert [h["score"] for h in qdrant_hits] == pytest.approx([h["score"] for h in faiss_hits], abs=1e-5)
    again = run(qdrant_env, "migrate", "--from", "faiss", "--to", "qdrant")  # finishing a copy twice is harmless
    assert "8 images copied" in again and "counts match (8)" in again


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "faiss", "--to", "faiss"), "nothing to migrate"),
        (("--from", "qdrant", "--to", "faiss"), "no collection 'default'"),
    ],
)
def test_migrate_refuses_what_it_cannot_copy(qdrant_env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    result = run(qdrant_env, "migrate", *args, ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_a_qdrant_url_setting_selects_server_mode(cli_env: dict[str, str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**cli_env, "VLSEARCH_STORE": "qdrant", "VLSEARCH_QDRANT_URL": url, "VLSEARCH_QDRANT_API_KEY": "k"}
    result = run(env, "search", "x", ok=False)
    assert result.exit_code == 1 and f"cannot reach Qdrant at {url}" in result.output
