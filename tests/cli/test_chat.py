"""`vlsearch chat IMAGE`: questions line by line from a pipe, answers kept as history, /reset, end of input ends;
on the shipped shapes-world DeepSeek-VL."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.container import SHIPPED_VLM_MODELS
from models.shapes_world import generate_scenes, render
from tests.processes import VLSEARCH

if not (SHIPPED_VLM_MODELS["shapes-vlm"] / "config.json").exists():
    pytest.skip("the shipped shapes-vlm is not built yet", allow_module_level=True)


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "VLSEARCH_VLM_MODEL": "shapes-vlm", "VLSEARCH_VLM_DEVICE": "cpu"}


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    render(generate_scenes("test", 1, seed=4)[0], 64).save(path)
    return path


def chat(env: dict[str, str], *args: str, lines: list[str]) -> tuple[list[dict], str]:
    result = CliRunner().invoke(app, ["chat", *args, "--json"], input="".join(line + "\n" for line in lines), env=env)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_piped_questions_get_one_answer_each_from_a_real_process(env: dict[str, str], scene: Path) -> None:
    process = subprocess.run(
        [VLSEARCH, "chat", str(scene)],
        input="what colour is the circle?\n\nhow many shapes are there?\n",
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    answers = process.stdout.splitlines()
    assert len(answers) == 2  # the empty line asks nothing
    assert "Traceback" not in process.stderr


def test_each_answer_reads_the_turns_before_it_and_reset_starts_over(env: dict[str, str], scene: Path) -> None:
    lines = [
        "what colour is the circle?",
        "how many shapes are there?",
        "is there a red square?",
        "/reset",
        "how many shapes are there?",
    ]
    answers, stderr = chat(env, str(scene), lines=lines)
    assert [answer["question"] for answer in answers] == [line for line in lines if line != "/reset"]
    assert [answer["turns_used"] for answer in answers] == [0, 1, 2, 0]
    assert all(answer["turns_dropped"] == 0 and answer["image"] == str(scene) for answer in answers)
    assert "New conversation" in stderr
    # Greedy: the same conversation again gives the same answers.
    again, _ = chat(env, str(scene), lines=lines[:2])
    assert [answer["answer"] for answer in again] == [answer["answer"] for answer in answers[:2]]


def test_older_turns_dropped_to_fit_are_said_and_not_sent_again(env: dict[str, str], scene: Path) -> None:
    lines = [f"is there a red circle or a blue square or a green triangle number {i}?" for i in range(12)]
    answers, stderr = chat({**env, "VLSEARCH_VLM_MAX_NEW_TOKENS": "8"}, str(scene), lines=lines)
    assert len(answers) == 12
    dropped = [answer["turns_dropped"] for answer in answers]
    assert any(dropped) and "dropped to fit the model's context" in stderr
    used = [answer["turns_used"] for answer in answers]
    for before, after, left_out in zip(used, used[1:], dropped[1:], strict=False):
        assert after == before + 1 - left_out  # the history is what the model read last time, plus one turn


def test_a_bad_question_is_an_error_line_and_the_conversation_goes_on(env: dict[str, str], scene: Path) -> None:
    answers, stderr = chat(env, str(scene), lines=["red " * 300, "how many shapes are there?"])
    assert len(answers) == 1 and answers[0]["turns_used"] == 0
    assert "error:" in stderr and "positions" in stderr


def test_an_image_that_cannot_be_found_ends_before_any_question(env: dict[str, str], tmp_path: Path) -> None:
    for image in ("abcdef12", str(tmp_path / "absent.png")):
        result = CliRunner().invoke(app, ["chat", image], input="what?\n", env=env)
        assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("error:")
