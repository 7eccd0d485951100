"""`search --rerank --captions`, `caption` and `ask` wired to a tiny random DeepSeek-VL (wiring, not quality)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli.conftest import run
from tests.reranker.conftest import save_tiny


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("vlm") / "tiny-vlm", hybrid=False)


@pytest.fixture
def env(cli_env: dict[str, str], tiny_vlm: Path) -> dict[str, str]:
    return {
        **cli_env,
        "VLSEARCH_VLM_MODEL": str(tiny_vlm),
        "VLSEARCH_VLM_DEVICE": "cpu",
        "VLSEARCH_VLM_MAX_NEW_TOKENS": "6",
    }


def test_search_with_rerank_and_captions(env: dict[str, str], image_folder: Path) -> None:
    run(env, "index", str(image_folder), "--json")
    hits = run(env, "search", "a red circle", "--k", "4", "--rerank", "--rerank-k", "8", "--captions", "--json")
    assert len(hits) == 4
    rerank_scores = [hit["rerank_score"] for hit in hits]
    assert all(0.0 <= s <= 1.0 for s in rerank_scores) and rerank_scores == sorted(rerank_scores, reverse=True)
    assert all(len(hit["captions"]) == 1 for hit in hits)
    (model_key,) = hits[0]["captions"]
    again = run(env, "search", "a red circle", "--k", "4", "--rerank", "--rerank-k", "8", "--json")
    assert [h["id"] for h in again] == [h["id"] for h in hits]
    assert [h["captions"][model_key] for h in again] == [h["captions"][model_key] for h in hits]  # cached


def test_caption_command_captions_every_image_once(env: dict[str, str], image_folder: Path) -> None:
    run(env, "index", str(image_folder), "--json")
    rows = run(env, "caption", "--json")
    assert len(rows) == 8 and all(isinstance(r["caption"], str) for r in rows)
    assert all("Assistant" not in r["caption"] and "<image_placeholder>" not in r["caption"] for r in rows)
    one = run(env, "caption", rows[0]["id"], "--json")
    assert one == [rows[0]]


def test_ask_answers_about_a_file(env: dict[str, str], image_folder: Path) -> None:
    answer = run(env, "ask", str(image_folder / "home" / "img5.png"), "What colour is the circle?", "--json")
    assert isinstance(answer["answer"], str) and "User:" not in answer["answer"]


def test_missing_generative_model_is_one_line_naming_the_setting(
    env: dict[str, str], image_folder: Path, tmp_path: Path
) -> None:
    result = run(
        {**env, "VLSEARCH_VLM_MODEL": str(tmp_path / "no-model")},
        "ask",
        str(image_folder / "home" / "img5.png"),
        "what?",
        ok=False,
    )
    assert result.exit_code == 1 and "VLSEARCH_VLM_MODEL" in result.output and "Traceback" not in result.output


def test_search_with_min_relevance_sort_and_taken_bounds(env: dict[str, str], image_folder: Path) -> None:
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    for i, path in enumerate(files):  # no EXIF: `taken` is the mtime, one day apart
        os.utime(path, (1_600_000_000 + 86_400 * i, 1_600_000_000 + 86_400 * i))
    run(env, "index", str(image_folder), "--json")
    everything = run(env, "search", "a red circle", "--k", "8", "--rerank-k", "8", "--min-relevance", "0", "--json")
    assert len(everything) == 8 and all(0.0 <= hit["relevance"] <= 1.0 for hit in everything)
    cut = sorted(hit["relevance"] for hit in everything)[4]
    args = ("--min-relevance", str(cut), "--sort", "date", "--taken-after", "2020-09-14", "--taken-before",
            "2020-09-20T12:26:40")  # fmt: skip
    hits = run(env, "search", "a red circle", "--k", "8", "--rerank-k", "8", *args, "--json")
    assert hits and all(hit["relevance"] >= cut - 1e-6 for hit in hits)
    assert all("2020-09-14" <= hit["taken"] <= "2020-09-20T12:26:40" for hit in hits)
    assert [hit["taken"] for hit in hits] == sorted((hit["taken"] for hit in hits), reverse=True)
    bad = run(env, "search", "x", "--taken-after", "soon", ok=False)
    assert bad.exit_code == 1 and "ISO 8601" in bad.output
