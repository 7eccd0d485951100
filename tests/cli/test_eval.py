"""`vlsearch eval` on the shipped models prints every figure next to its target, questions and cutoff included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import run


@pytest.mark.slow
def test_eval_reports_questions_calibration_and_cutoff_with_their_targets(tmp_path: Path) -> None:
    env = {"VLSEARCH_DATA_DIR": str(tmp_path / "data"), "VLSEARCH_DEVICE": "cpu", "VLSEARCH_VLM_DEVICE": "cpu"}
    report = run(env, "eval", "--scenes", "40", "--queries", "40", "--sizes", "64", "--json")
    (sized,) = report["sizes"]
    assert set(sized["questions"]) >= {"questions", "q colour", "q relation", "q what_relation"}
    assert 0 <= sized["vqa_ece"] <= 1
    assert set(sized["cutoff"]) == {"cutoff precision", "cutoff recall"}
    targets = {row["target"]: row for row in report["targets"]}
    for name in ("questions answered exactly", "vqa true caption over each hard swap", "vqa rerank relation R@1 gain",
                 "cutoff precision (P(Yes) >= 0.5)", "cutoff recall (P(Yes) >= 0.5)"):
        assert targets[name]["at_most"] is False and targets[name]["met"] is (
            targets[name]["value"] >= targets[name]["threshold"])
    ece = targets["P(Yes) expected calibration error"]
    assert ece["at_most"] is True and ece["met"] is (ece["value"] <= ece["threshold"])
    # The shipped model answers well even on 40 scenes (the rerank gain needs a larger collection to mean much).
    assert targets["questions answered exactly"]["value"] >= 0.8
    text = run(env, "eval", "--scenes", "20", "--queries", "30", "--sizes", "64", "--no-rerank")
    assert "targets" in text and "CLIP object R@10" in text
