"""Every error a user can meet through the CLI is one line on stderr and exit status 1, never a traceback; the
libraries' own log messages stay out unless --verbose."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from indexer.errors import VlsearchError
from retriever.errors import CollectionClosed, PointNotFound, SaveFailed, StoreBusy
from retriever.faiss_store import FaissStore
from tests.cli.conftest import run

REPO = Path(__file__).resolve().parents[2]
NO_ID = "0123456789abcdef0123456789abcdef"


def one_line_error(result: Result) -> str:
    """The single line a failed command printed (and checks that it failed that way)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("VLSEARCH_MAX_IMAGE_BYTES", "0", "greater than or equal to 1"),
        ("VLSEARCH_MAX_IMAGE_PIXELS", "-5", "greater than or equal to 1"),
        ("VLSEARCH_BATCH_SIZE", "abc", "valid integer"),
        ("VLSEARCH_DECODE_WORKERS", "0", "greater than or equal to 1"),
        ("VLSEARCH_IMAGE_WORKERS", "0", "greater than or equal to 1"),
        ("VLSEARCH_MAX_K", "0", "greater than or equal to 1"),
        ("VLSEARCH_STORE", "elsewhere", "'faiss' or 'qdrant'"),
        ("VLSEARCH_LOCK_TIMEOUT", "soon", "valid number"),
        ("VLSEARCH_TEXT_TEMPLATES", "[not json", "not valid JSON"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_the_variable(
    cli_env: dict[str, str], image_folder: Path, variable: str, value: str, expected: str
) -> None:
    line = one_line_error(run({**cli_env, variable: value}, "index", str(image_folder), ok=False))
    assert variable in line and expected in line


def test_an_invalid_option_value_is_refused_like_its_setting(cli_env: dict[str, str], image_folder: Path) -> None:
    line = one_line_error(run(cli_env, "index", str(image_folder), "--batch-size", "-1", ok=False))
    assert "VLSEARCH_BATCH_SIZE" in line


@pytest.mark.parametrize("command", [("similar", NO_ID), ("search", "--image", NO_ID)])
def test_an_unknown_image_id_is_one_line(cli_env: dict[str, str], image_folder: Path, command: tuple[str, ...]) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    line = one_line_error(run(cli_env, *command, ok=False))
    assert f"no image with id '{NO_ID}'" in line


def test_caption_of_an_unknown_id_is_one_line(cli_env: dict[str, str], image_folder: Path) -> None:
    run(cli_env, "index", str(image_folder), "--json")
    env = {**cli_env, "VLSEARCH_VLM_MODEL": "shapes-vlm", "VLSEARCH_VLM_DEVICE": "cpu"}
    assert NO_ID in one_line_error(run(env, "caption", NO_ID, ok=False))


def test_a_database_locked_by_another_writer_is_one_line_naming_the_timeout(
    cli_env: dict[str, str], image_folder: Path
) -> None:
    hits = run(cli_env, "index", str(image_folder), "--json")
    assert hits["count"] == 8
    some_id = run(cli_env, "search", "x", "--k", "1", "--json")[0]["id"]
    database = Path(cli_env["VLSEARCH_DATA_DIR"]) / "collections" / "default" / "payloads.sqlite"
    other_writer = sqlite3.connect(database, isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")  # another process is writing
    try:
        env = {**cli_env, "VLSEARCH_LOCK_TIMEOUT": "0.2"}
        line = one_line_error(run(env, "delete", some_id, ok=False))
        assert "VLSEARCH_LOCK_TIMEOUT" in line
        assert len(run(env, "search", "x", "--k", "3", "--json")) == 3  # readers are not held up
    finally:
        other_writer.rollback()
        other_writer.close()
    assert run(cli_env, "delete", some_id, "--json")["deleted"] == 1


@pytest.mark.parametrize(
    ("method", "error", "command"),
    [
        ("search", CollectionClosed("collection 'default' is closed"), ("search", "x")),
        ("search", StoreBusy("collection 'default' stayed locked\nfor more than 5s"), ("search", "x")),
        ("get", PointNotFound("no image with id 'abc' in collection 'default'"), ("similar", "abc")),
        ("save", SaveFailed("cannot write index.faiss: [Errno 28] No space left on device"), ("delete", "abc")),
    ],
)
def test_a_typed_store_error_reaches_the_cli_as_one_line(
    cli_env: dict[str, str],
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    error: VlsearchError,
    command: tuple[str, ...],
) -> None:
    run(cli_env, "index", str(image_folder), "--json")

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(FaissStore, method, fails)
    line = one_line_error(run(cli_env, *command, ok=False))
    assert line == "error: " + " ".join(str(error).split())


def vlsearch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", [(), ("--model", "hf-hub:nobody/none")], ids=["default-tag", "hf-hub"])
def test_a_hub_model_offline_is_one_line_and_library_logs_need_verbose(
    tmp_path: Path, image_folder: Path, model: tuple[str, ...]
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLSEARCH_")}
    env.update(HF_HUB_OFFLINE="1", VLSEARCH_DATA_DIR=str(tmp_path / "data"), VLSEARCH_DEVICE="cpu")
    quiet = vlsearch(env, "index", str(image_folder), *model)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().count("\n") == 0 and "could not load weights" in quiet.stderr, quiet.stderr
    loud = vlsearch(env, "--verbose", "index", str(image_folder), *model)
    assert loud.returncode == 1 and "Traceback" not in loud.stderr
    lines = loud.stderr.strip().splitlines()
    assert len(lines) > 1 and lines[-1].startswith("error: could not load weights")


def test_a_faiss_device_that_is_not_there_is_one_line_naming_the_variable(
    cli_env: dict[str, str], image_folder: Path
) -> None:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU build of faiss and a GPU")
    line = one_line_error(run({**cli_env, "VLSEARCH_FAISS_DEVICE": "cuda"}, "index", str(image_folder), ok=False))
    assert "VLSEARCH_FAISS_DEVICE=cuda" in line
