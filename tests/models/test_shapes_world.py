"""The shapes world keeps the page's vocabulary, geometry, grammar and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.shapes_world import (
    ALIGNED_MAX_OFFSET,
    BACKGROUND_RANGE,
    COLOUR_TOLERANCE,
    COLOURS,
    RELATION_MIN_OFFSET,
    RELATIONS,
    SIZE_DIAMETERS,
    AttributeCombo,
    Caption,
    CaptionError,
    ObjectPhrase,
    RelationCombo,
    Scene,
    SceneObject,
    caption_is_complete,
    caption_is_true,
    complete_captions,
    default_held_out,
    generate_scenes,
    hard_negatives,
    hard_negatives_for,
    held_out_combinations,
    parse_caption,
    queries,
    read_collection,
    relevance_matrix,
    render,
    true_captions,
    write_collection,
)


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return generate_scenes("train", 1500, seed=11)


@pytest.fixture(scope="module")
def test_scenes() -> list[Scene]:
    return generate_scenes("test", 1500, seed=11)


def _two_object(scenes: list[Scene]) -> list[Scene]:
    return [s for s in scenes if len(s.objects) == 2]


def _scene(first: SceneObject, second: SceneObject | None = None) -> Scene:
    return Scene((first,) if second is None else (first, second), (240, 240, 240))


RED_CIRCLE = SceneObject("circle", "red", "large", (0.25, 0.3), 0.32, (220, 40, 40))
BLUE_SQUARE = SceneObject("square", "blue", "small", (0.75, 0.32), 0.18, (40, 70, 220))


# ---------------------------------------------------------------- generation and geometry

def test_same_seed_gives_the_same_scenes_and_pixels() -> None:
    first, again = generate_scenes("train", 20, seed=5), generate_scenes("train", 20, seed=5)
    assert first == again
    assert render(first[3], 64).tobytes() == render(again[3], 64).tobytes()
    assert generate_scenes("train", 20, seed=6) != first
    assert generate_scenes("validation", 20, seed=5) != first


def test_scenes_can_be_generated_from_any_start_index() -> None:
    assert generate_scenes("test", 5, seed=2, start=10) == generate_scenes("test", 15, seed=2)[10:]


def test_objects_keep_the_pages_sizes_colours_and_background(test_scenes: list[Scene]) -> None:
    for scene in test_scenes:
        assert all(BACKGROUND_RANGE[0] <= c <= BACKGROUND_RANGE[1] for c in scene.background)
        assert 1 <= len(scene.objects) <= 2
        for obj in scene.objects:
            low, high = SIZE_DIAMETERS[obj.size]
            assert low <= obj.diameter <= high
            assert all(abs(c - a) <= COLOUR_TOLERANCE for c, a in zip(obj.rgb, COLOURS[obj.colour], strict=True))
            assert all(obj.diameter / 2 <= c <= 1 - obj.diameter / 2 for c in obj.centre)


def test_two_objects_never_sit_at_a_borderline_offset_nor_overlap(test_scenes: list[Scene]) -> None:
    pairs = _two_object(test_scenes)
    assert len(pairs) > 500
    for scene in pairs:
        a, b = scene.objects
        offsets = [abs(a.centre[axis] - b.centre[axis]) for axis in (0, 1)]
        assert all(d < ALIGNED_MAX_OFFSET or d >= RELATION_MIN_OFFSET for d in offsets)
        apart = (a.diameter + b.diameter) / 2
        assert any(d > apart for d in offsets)  # their bounding boxes are disjoint
        assert (a.colour, a.shape) != (b.colour, b.shape)


def test_relations_follow_the_centre_offset_rule(test_scenes: list[Scene]) -> None:
    for scene in _two_object(test_scenes):
        a, b = scene.objects
        dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
        expected = set()
        if abs(dx) >= RELATION_MIN_OFFSET:
            expected |= {(0, "left of", 1), (1, "right of", 0)} if dx > 0 else {(0, "right of", 1), (1, "left of", 0)}
        if abs(dy) >= RELATION_MIN_OFFSET:
            expected |= {(0, "above", 1), (1, "below", 0)} if dy > 0 else {(0, "below", 1), (1, "above", 0)}
        assert {tuple(r) for r in scene.relations()} == expected
        assert expected, "two objects that do not overlap always stand in some relation"


def test_every_relation_occurs_in_a_generated_set(test_scenes: list[Scene]) -> None:
    seen = {r.name for s in test_scenes for r in s.relations()}
    assert seen == set(RELATIONS)


def test_scene_survives_a_round_trip_through_its_dict(test_scenes: list[Scene]) -> None:
    for scene in test_scenes[:50]:
        assert Scene.from_dict(scene.to_dict()) == scene


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("side", [64, 256])
def test_rendering_shows_each_object_in_its_colour_at_its_centre(side: int, test_scenes: list[Scene]) -> None:
    for scene in test_scenes[:100]:
        image = render(scene, side)
        assert image.size == (side, side) and image.mode == "RGB"
        pixels = np.asarray(image).astype(int)
        assert np.abs(pixels[0, 0] - scene.background).max() <= 1  # corners stay background
        for obj in scene.objects:
            x, y = (min(side - 1, int(c * side)) for c in obj.centre)
            assert np.abs(pixels[y, x] - COLOURS[obj.colour]).max() <= COLOUR_TOLERANCE


def test_renders_at_64_and_256_px_show_the_same_scene() -> None:
    scene = _scene(RED_CIRCLE, BLUE_SQUARE)
    small = np.asarray(render(scene, 64)).astype(float)
    large = np.asarray(render(scene, 256).resize((64, 64), Image.Resampling.BOX)).astype(float)
    assert np.abs(small - large).mean() < 2.0


def test_edges_are_antialiased_at_64_px() -> None:
    pixels = np.asarray(render(_scene(RED_CIRCLE), 64)).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert len(colours) > 2, "a supersampled circle has blended edge pixels, not just fill and background"


def test_canvas_under_64_px_is_refused() -> None:
    with pytest.raises(ValueError, match="64"):
        render(_scene(RED_CIRCLE), 63)


# ---------------------------------------------------------------- captions

def test_true_captions_parse_back_into_the_scenes_objects_and_relations(test_scenes: list[Scene]) -> None:
    for scene in test_scenes[:300]:
        captions = true_captions(scene)
        assert captions
        relations = {(scene.objects[r.subject], r.name, scene.objects[r.target]) for r in scene.relations()}
        for text in captions:
            caption = parse_caption(text)
            assert caption.text == text
            if caption.relation is None:
                assert any(caption.subject.matches(o) for o in scene.objects)
            else:
                assert caption.target is not None
                assert any(caption.subject.matches(a) and caption.target.matches(b) and name == caption.relation
                           for a, name, b in relations)


def test_a_two_object_scene_is_captioned_from_either_object_with_and_without_sizes() -> None:
    captions = set(true_captions(_scene(RED_CIRCLE, BLUE_SQUARE)))
    assert {"a red circle left of a blue square", "a blue square right of a red circle",
            "a large red circle left of a small blue square", "a red circle left of a small blue square",
            "a red circle", "a large red circle", "a small blue square"} <= captions
    assert not any("above" in c or "below" in c for c in captions)  # their heights differ by 0.02 only
    assert complete_captions(_scene(RED_CIRCLE)) == ["a large red circle", "a red circle"]
    assert all(" of " in c for c in complete_captions(_scene(RED_CIRCLE, BLUE_SQUARE)))


def test_caption_is_true_agrees_with_true_captions_on_every_query(test_scenes: list[Scene]) -> None:
    every_query = queries("object") + queries("attribute") + queries("relation")
    for scene in test_scenes[:8]:
        truths = set(true_captions(scene))
        assert [caption_is_true(scene, q) for q in every_query] == [q in truths for q in every_query]


def test_parsing_ignores_case_and_spacing() -> None:
    caption = parse_caption("  A Large RED circle   LEFT of a blue  square ")
    assert caption == Caption(ObjectPhrase("red", "circle", "large"), "left of", ObjectPhrase("blue", "square"))
    assert caption.kind == "sized_relation"


@pytest.mark.parametrize("text", [
    "", "red circle", "a red", "a pink circle", "a large red", "a huge red circle", "a red circle near a blue square",
    "a red circle left of", "a red circle left a blue square", "a red circle left of a blue square and a circle",
    "a red circle.", "the red circle",
])
def test_text_outside_the_grammar_is_refused(text: str) -> None:
    with pytest.raises(CaptionError):
        parse_caption(text)


# ---------------------------------------------------------------- queries and hard negatives

def test_query_lists_cover_every_colour_shape_pair() -> None:
    assert len(set(queries("object"))) == 24
    assert len(set(queries("attribute"))) == 48
    assert len(set(queries("relation"))) == 24 * 23 * 4
    assert {parse_caption(q).kind for q in queries("relation")} == {"relation"}


def test_object_query_is_relevant_to_every_scene_containing_that_object(test_scenes: list[Scene]) -> None:
    relevant = relevance_matrix(["a red circle"], test_scenes)[0]
    containing = [any((o.colour, o.shape) == ("red", "circle") for o in s.objects) for s in test_scenes]
    assert relevant.tolist() == containing
    assert 0 < sum(containing) < len(test_scenes)


def test_hard_negatives_swap_colours_swap_shapes_and_invert_the_relation() -> None:
    assert hard_negatives("a red circle left of a small blue square") == [
        "a blue circle left of a small red square",
        "a red square left of a small blue circle",
        "a red circle right of a small blue square",
    ]
    # Swapping two equal colours would give the caption back, so it is not offered.
    assert hard_negatives("a red circle above a red square") == [
        "a red square above a red circle", "a red circle below a red square"]
    with pytest.raises(ValueError):
        hard_negatives("a red circle")


def test_hard_negatives_of_true_relation_captions_are_false_for_the_scene(test_scenes: list[Scene]) -> None:
    checked = 0
    for scene in _two_object(test_scenes)[:300]:
        for caption in true_captions(scene, kinds=("relation", "sized_relation")):
            negatives = hard_negatives(caption)
            assert negatives and all(not caption_is_true(scene, n) for n in negatives)
            assert hard_negatives_for(scene, caption) == negatives
            checked += len(negatives)
    assert checked > 1000


# ---------------------------------------------------------------- splits

def test_held_out_sets_are_about_a_tenth_and_keep_each_pair_seen_at_the_other_size() -> None:
    held = default_held_out()
    assert held == held_out_combinations(0)
    assert 4 <= len(held.attributes) <= 6
    for combo in held.attributes:
        other = "large" if combo.size == "small" else "small"
        assert AttributeCombo(other, combo.colour, combo.shape) not in held.attributes
    assert 0.08 * 2208 <= len(held.relations) <= 0.12 * 2208
    assert all(r.converse() in held.relations for r in held.relations)
    assert held_out_combinations(1) != held


def test_train_and_validation_never_contain_held_out_combinations(train_scenes: list[Scene]) -> None:
    held = default_held_out()
    validation = generate_scenes("validation", 500, seed=11)
    for scene in [*train_scenes, *validation]:
        assert not held.scene_uses(scene)
        for obj in scene.objects:
            assert AttributeCombo(obj.size, obj.colour, obj.shape) not in held.attributes
        for r in scene.relations():
            a, b = scene.objects[r.subject], scene.objects[r.target]
            assert RelationCombo(a.colour, a.shape, r.name, b.colour, b.shape) not in held.relations


def test_test_split_contains_held_out_combinations(test_scenes: list[Scene]) -> None:
    held = default_held_out()
    attributes = {AttributeCombo(o.size, o.colour, o.shape) for s in test_scenes for o in s.objects}
    relations = {RelationCombo(s.objects[r.subject].colour, s.objects[r.subject].shape, r.name,
                               s.objects[r.target].colour, s.objects[r.target].shape)
                 for s in test_scenes for r in s.relations()}
    assert held.attributes <= attributes
    assert len(held.relations & relations) > 50


def test_held_out_queries_are_recognised() -> None:
    held = default_held_out()
    combo = sorted(held.attributes)[0]
    assert held.query_uses(f"a {combo.size} {combo.colour} {combo.shape}")
    assert not held.query_uses(f"a {combo.colour} {combo.shape}")
    fact = sorted(held.relations)[0]
    text = f"a {fact.subject_colour} {fact.subject_shape} {fact.relation} a {fact.target_colour} {fact.target_shape}"
    assert held.query_uses(text)


# ---------------------------------------------------------------- collections on disk

@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_written_collection_reads_back_its_scenes_and_images(tmp_path: Path, image_format: str) -> None:
    scenes = generate_scenes("test", 6, seed=3)
    write_collection(scenes, tmp_path, size=96, image_format=image_format)
    read = read_collection(tmp_path)
    assert [scene for _, scene in read] == scenes
    for path, scene in read:
        with Image.open(path) as image:
            assert image.size == (96, 96)
            assert image.format == image_format.upper()
            obj = scene.objects[0]
            x, y = (int(c * 96) for c in obj.centre)
            rgb = np.asarray(image.convert("RGB"))[y, x].astype(int)
            assert np.abs(rgb - COLOURS[obj.colour]).max() <= COLOUR_TOLERANCE + 3


def test_a_caption_that_misses_an_object_or_lies_is_not_complete() -> None:
    two = next(s for s in generate_scenes("test", 40, seed=2024) if len(s.objects) == 2)
    a, b = two.objects
    assert not caption_is_complete(two, f"a {a.colour} {a.shape}")
    assert not caption_is_complete(two, "not a caption at all")
    relation = next(r for r in two.relations() if r.subject == 0).name
    assert caption_is_complete(two, f"a {a.colour} {a.shape} {relation} a {b.colour} {b.shape}")
    assert not caption_is_complete(two, f"a {b.colour} {b.shape} {relation} a {a.colour} {a.shape}"), "inverted"
