"""The question grammar of SHAPES_WORLD.md ("Questions"): every question asked only where defined, exact answers,
balanced yes/no with hard negatives, and the page's rule for when an answer counts as correct."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from models.shapes_world import (
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    SceneObject,
    answer_is_correct,
    generate_scenes,
    question_set,
    questions_for,
    relations_between,
)
from models.train_vlm_questions import prefix_truths


def scene_of(*objects: tuple[str, str, str, float, float]) -> Scene:
    """A scene from (shape, colour, size, x, y) tuples; diameters and fills follow the size and colour."""
    return Scene(
        tuple(
            SceneObject(shape, colour, size, (x, y), 0.2 if size == "small" else 0.35, COLOURS[colour])
            for shape, colour, size, x, y in objects
        ),
        (240, 240, 240),
    )


# A red circle clearly left of and above a large blue square.
TWO = scene_of(("circle", "red", "small", 0.2, 0.2), ("square", "blue", "large", 0.7, 0.7))
# Same shape twice, aligned vertically: no "above"/"below" holds.
SAME_SHAPE = scene_of(("circle", "red", "small", 0.2, 0.5), ("circle", "green", "large", 0.7, 0.52))


def answers(scene: Scene) -> dict[str, str]:
    return {q.text: q.answer for qs in questions_for(scene).values() for q in qs}


def test_each_kind_answers_exactly_as_the_page_says() -> None:
    got = answers(TWO)
    assert got["what colour is the circle?"] == "red"
    assert got["what shape is the blue object?"] == "square"
    assert got["what size is the blue square?"] == "large"
    assert got["how many shapes are there?"] == "two"
    assert got["is there a red circle?"] == "yes"
    assert got["is there a blue circle?"] == "no"
    assert got["is the red circle left of the blue square?"] == "yes"
    assert got["is the red circle above the blue square?"] == "yes"
    assert got["is the red circle right of the blue square?"] == "no"
    assert got["is the blue square below the red circle?"] == "yes"
    assert got["what is left of the blue square?"] == "a red circle"
    assert got["what is right of the blue square?"] == "nothing"
    assert got["what is below the red circle?"] == "a blue square"


def test_questions_are_asked_only_where_their_answer_is_defined() -> None:
    got = answers(SAME_SHAPE)
    assert "what colour is the circle?" not in got, "two circles: 'the circle' names no one object"
    assert got["what shape is the green object?"] == "circle"
    assert got["is the red circle above the green circle?"] == "no", "aligned: that axis holds no relation"
    assert got["what is above the red circle?"] == "nothing"
    single = scene_of(("diamond", "yellow", "small", 0.5, 0.5))
    one = answers(single)
    assert one["how many shapes are there?"] == "one"
    assert not [t for t in one if t.startswith("is the ")], "a relation question needs two objects"
    assert all(one[f"what is {r} the yellow diamond?"] == "nothing" for r in ("left of", "right of", "above", "below"))


def test_answers_agree_with_the_scene_geometry_on_many_scenes() -> None:
    for scene in generate_scenes("test", 200, seed=11):
        for question in questions_for(scene).get("relation", []):
            words = question.text.removeprefix("is the ").removesuffix("?").split(" the ")
            a, rest = words[0], words[1]
            subject = next(o for o in scene.objects if f"{o.colour} {o.shape}" in a)
            target = next(o for o in scene.objects if f"{o.colour} {o.shape}" == rest)
            relation = a.removeprefix(f"{subject.colour} {subject.shape} ")
            assert question.answer == ("yes" if relation in relations_between(subject, target) else "no")
        count = questions_for(scene)["count"][0]
        assert count.answer == ("one", "two")[len(scene.objects) - 1]


def test_question_sets_are_seeded_cover_every_kind_and_balance_yes_and_no() -> None:
    scenes = generate_scenes("test", 300, seed=3)
    asked = question_set(scenes, seed=0)
    assert asked == question_set(scenes, seed=0)
    assert {q.kind for _, q in asked} == set(QUESTION_KINDS)
    for kind in ("exists", "relation"):
        chosen = [q for _, q in asked if q.kind == kind]
        yes = sum(q.answer == "yes" for q in chosen) / len(chosen)
        assert 0.42 <= yes <= 0.58, f"{kind}: {yes:.2f} yes"
        noes = [q for q in chosen if q.answer == "no"]
        assert sum(q.hard for q in noes) / len(noes) >= 0.6, "most noes are hard negatives"
    exists_noes = [q for _, q in asked if q.kind == "exists" and q.hard]
    for scene_index, question in ((i, q) for i, q in asked if q in exists_noes):
        colour, shape = question.text.removeprefix("is there a ").removesuffix("?").split()
        objects = scenes[scene_index].objects
        assert any(o.colour == colour or o.shape == shape for o in objects), "a hard no swaps a colour or a shape"


def test_yes_no_questions_name_only_the_vocabulary() -> None:
    texts = [q.text for qs in questions_for(TWO).values() for q in qs]
    words = Counter(w.strip("?") for t in texts for w in t.split())
    assert set(COLOURS) | set(SHAPES) <= set(words)


@pytest.mark.parametrize(
    ("expected", "given", "correct"),
    [
        ("red", "red", True),
        ("red", "Red.", True),
        ("red", "the red", True),
        ("red", "a red one", False),
        ("a red circle", "A red circle!", True),
        ("a red circle", "red circle", False),
        ("nothing", "Nothing", True),
        ("yes", "no", False),
        ("two", " two ", True),
    ],
)
def test_an_answer_counts_after_lower_casing_and_stripping_punctuation_and_a_leading_article(
    expected: str, given: str, correct: bool
) -> None:
    assert answer_is_correct(expected, given) is correct


def test_the_truth_of_a_statement_word_by_word() -> None:
    words = ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert prefix_truths(TWO, words) == [None, True, True, None, True, None, True, True]
    inverted = ["a", "red", "circle", "right", "of", "a", "blue", "square"]
    assert prefix_truths(TWO, inverted) == [None, True, True, None, False, None, False, False]
    swapped = ["is", "the", "blue", "circle", "above", "the", "red", "square", "?"]
    assert prefix_truths(TWO, swapped) == [None, None, True, False, False, None, False, False, None]
    assert np.mean([t for t in prefix_truths(TWO, ["a", "green", "square"]) if t is not None]) < 0.5


def test_platt_scaling_recovers_the_scale_and_bias_that_made_the_labels() -> None:
    from models.vlm_eval import expected_calibration_error, platt_scaling

    rng = np.random.default_rng(0)
    log_odds = rng.normal(0, 3, 20_000)
    truths = rng.random(20_000) < 1 / (1 + np.exp(-(0.5 * log_odds - 1.0)))
    scale, bias = platt_scaling(log_odds.tolist(), truths.tolist())
    assert scale == pytest.approx(0.5, abs=0.05) and bias == pytest.approx(-1.0, abs=0.08)
    raw = (1 / (1 + np.exp(-log_odds))).tolist()
    fitted = (1 / (1 + np.exp(-(scale * log_odds + bias)))).tolist()
    assert expected_calibration_error(fitted, truths.tolist()) < 0.02 < expected_calibration_error(raw, truths.tolist())
