"""Zero-shot tagging from stored vectors: vocabularies, calibrated scores, writing tags, export.

The quality tests run the shipped shapes-clip on shapes-world TEST scenes indexed by the real pipeline; the
calibration they use was fitted on the VALIDATION split (checked here too). The bookkeeping tests use an encoder
whose label embeddings are known axes, on both stores.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from core.container import SHIPPED_CLIP_MODELS, Container
from core.settings import Settings
from indexer.encoder import ClipEncoder
from indexer.pipeline import index_images
from indexer.sources import iter_sources
from models.shapes_world import COLOURS, SHAPES, Scene, generate_scenes, read_collection, render, write_collection
from retriever.errors import EncoderMismatch
from retriever.store import Filter, PayloadUpdate, VectorStore
from retriever.tagging import (
    AUTO_TAGS_FIELD,
    SHAPES_CLIP_CALIBRATION,
    TAG_SCORES_FIELD,
    Calibration,
    InvalidVocabulary,
    TagReport,
    TagScorer,
    Vocabulary,
    calibration_for,
    default_vocabulary,
    export_tags,
    fit_calibration,
    load_vocabulary,
    parse_vocabulary,
    read_exported_tags,
    tag_collection,
    tag_records,
)
from tests.retriever.conftest import CONTRACT_DIM

OBJECT_LABELS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
TEST_SCENES = 1000
TEST_SEED = 2024
# From the CLIP scores alone, measured on these 1000 test scenes with the validation-fitted calibration: precision
# 0.56, recall 0.70 (per tag from 0.37 to 0.89). The shipped tiny model cannot do better from its 64-d vectors
# whatever the cut: its best label is right for 0.71 of these images, and its 3 best labels are needed to recall
# 0.82 (at precision under 0.5). These floors guard what it reaches. The target (precision >= 0.90, recall
# >= 0.80) is reached with verification by shapes-vlm (`submit tag --verify`): 0.98 / 0.95 on test scenes, in
# tests/workers/test_index_job.py; the verification's own threshold comes from models/fit_tag_verification.py.
PRECISION_FLOOR = 0.50
RECALL_FLOOR = 0.65

needs_shapes_clip = pytest.mark.skipif(
    not (SHIPPED_CLIP_MODELS["shapes-clip"] / "open_clip_config.json").exists(),
    reason="the shipped shapes-clip model is not built yet",
)


def objects_of(scene: Scene) -> set[str]:
    return {f"{obj.colour} {obj.shape}" for obj in scene.objects}


# ---------------------------------------------------------------- the shipped model on shapes-world scenes


@dataclass
class Tagged:
    store: VectorStore
    encoder: ClipEncoder
    truth: dict[str, set[str]]  # image id -> the scene's objects
    report: TagReport


@pytest.fixture(scope="module")
def shapes_encoder(tmp_path_factory: pytest.TempPathFactory) -> ClipEncoder:
    # The service's default prompt templates: the ones the calibration was fitted with.
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"), clip_model="shapes-clip", clip_pretrained=None, device="cpu"
    )
    return Container(settings).encoder()


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory, shapes_encoder: ClipEncoder) -> Iterator[Tagged]:
    """1000 test-split scenes (64 px PNG) indexed by the pipeline into FAISS, tagged with the 24 object labels."""
    root = tmp_path_factory.mktemp("tagging")
    folder = root / "scenes"
    write_collection(generate_scenes("test", TEST_SCENES, seed=TEST_SEED), folder, size=64)
    labels = root / "objects.txt"
    labels.write_text("# the shapes world's objects\n" + "\n".join(OBJECT_LABELS) + "\n", encoding="utf-8")
    settings = Settings(data_dir=root / "data", clip_model="shapes-clip", clip_pretrained=None, device="cpu")
    store = Container(settings).create_or_open_store("shapes", shapes_encoder)
    indexed = index_images(iter_sources([folder]), shapes_encoder, store, batch_size=64, workers=2)
    assert (indexed.added, indexed.failed) == (TEST_SCENES, [])
    by_path = store.ids_by_path([str(path) for path, _ in read_collection(folder)])
    truth = {by_path[str(path)]: objects_of(scene) for path, scene in read_collection(folder)}
    scorer = TagScorer(shapes_encoder, load_vocabulary(labels))
    report = tag_collection(store, scorer, batch_size=128)
    yield Tagged(store, shapes_encoder, truth, report)
    store.close()


def precision_recall(tagged: Tagged) -> tuple[float, float, dict[str, tuple[int, int, int]]]:
    """Overall precision and recall against the scenes' objects, and per label (true pos, false pos, false neg)."""
    per_label = {label: [0, 0, 0] for label in OBJECT_LABELS}
    for record in tagged.store.scroll():
        tags, objects = set(record.payload.get("tags", [])), tagged.truth[record.id]
        for label in tags | objects:
            per_label[label][0 if label in tags and label in objects else 1 if label in tags else 2] += 1
    tp, fp, fn = (sum(counts[i] for counts in per_label.values()) for i in range(3))
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), {k: (v[0], v[1], v[2]) for k, v in per_label.items()}


@needs_shapes_clip
@pytest.mark.slow
def test_object_tags_of_test_scenes_reach_the_measured_precision_and_recall(tagged: Tagged) -> None:
    precision, recall, per_label = precision_recall(tagged)
    print(f"\n{'tag':18s} {'precision':>9s} {'recall':>7s}   tp   fp   fn")
    for label, (tp, fp, fn) in sorted(per_label.items(), key=lambda item: item[1][0] / max(sum(item[1]), 1)):
        print(f"{label:18s} {tp / max(tp + fp, 1):9.2f} {tp / max(tp + fn, 1):7.2f} {tp:4d} {fp:4d} {fn:4d}")
    print(
        f"{'overall':18s} {precision:9.3f} {recall:7.3f}   ({TEST_SCENES} test scenes, {tagged.report.seconds:.2f} s)"
    )
    assert tagged.report.scanned == TEST_SCENES
    assert precision >= PRECISION_FLOOR
    assert recall >= RECALL_FLOOR


@needs_shapes_clip
@pytest.mark.slow
def test_tags_land_in_payloads_where_tag_filters_and_search_see_them(tagged: Tagged) -> None:
    counts = tagged.report.label_counts
    assert tagged.report.tagged == TEST_SCENES, "every image's best label is over the threshold"
    for label, count in counts.items():
        assert tagged.store.count(Filter(tags_any=(label,))) == count
    query = tagged.encoder.encode_texts(["red circle"])[0]
    hits = tagged.store.search(query, k=TEST_SCENES, filter=Filter(tags_any=("red circle",)))
    assert len(hits) == counts["red circle"] > 0
    for hit in hits:
        assert "red circle" in hit.payload["tags"]
        assert set(hit.payload[TAG_SCORES_FIELD]) == set(hit.payload["tags"]) == set(hit.payload[AUTO_TAGS_FIELD])
        assert all(SHAPES_CLIP_CALIBRATION.threshold <= p <= 1 for p in hit.payload[TAG_SCORES_FIELD].values())


@needs_shapes_clip
@pytest.mark.slow
def test_tagging_again_with_the_same_vocabulary_writes_nothing(tagged: Tagged) -> None:
    before = {record.id: record.payload for record in tagged.store.scroll()}
    again = tag_collection(tagged.store, TagScorer(tagged.encoder, Vocabulary.of(OBJECT_LABELS)), batch_size=100)
    assert (again.scanned, again.changed, again.label_counts) == (TEST_SCENES, 0, tagged.report.label_counts)
    assert {record.id: record.payload for record in tagged.store.scroll()} == before


@needs_shapes_clip
@pytest.mark.slow
@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_exported_tags_parse_back_to_the_stored_tags_and_scores(tagged: Tagged, format: str) -> None:
    output = io.StringIO()
    assert export_tags(tagged.store, format, output) == TEST_SCENES
    exported = {image.id: image for image in read_exported_tags(output.getvalue(), format)}
    assert len(exported) == TEST_SCENES
    for record in tagged.store.scroll():
        image = exported[record.id]
        assert image.paths == tuple(record.payload["paths"])
        assert image.tags == record.payload[TAG_SCORES_FIELD]
        assert list(image.tags) == record.payload["tags"]


@needs_shapes_clip
@pytest.mark.slow
def test_shipped_calibration_is_the_fit_on_the_validation_split(shapes_encoder: ClipEncoder) -> None:
    """Refits SHAPES_CLIP_CALIBRATION from the scenes its comment names (validation split, never test)."""
    assert calibration_for(shapes_encoder) is SHAPES_CLIP_CALIBRATION
    scenes = generate_scenes("validation", 1500, seed=0)
    vectors = np.concatenate(
        [shapes_encoder.encode_pil([render(s, 64) for s in scenes[i : i + 250]]) for i in range(0, len(scenes), 250)]
    )
    truth = np.array([[label in objects_of(scene) for label in OBJECT_LABELS] for scene in scenes])
    cosines = TagScorer(shapes_encoder, Vocabulary.of(OBJECT_LABELS)).cosines(vectors)
    fitted = fit_calibration(cosines, truth)
    assert fitted.scale == pytest.approx(SHAPES_CLIP_CALIBRATION.scale, abs=0.05)
    assert fitted.bias == pytest.approx(SHAPES_CLIP_CALIBRATION.bias, abs=0.005)
    assert fitted.threshold == pytest.approx(SHAPES_CLIP_CALIBRATION.threshold)


# ---------------------------------------------------------------- bookkeeping, with known label embeddings


class AxisEncoder:
    """Text i of `axes` embeds as the i-th unit vector; records what it was asked to embed."""

    name = "test-encoder"
    identity = "untrained"
    dim = CONTRACT_DIM

    def __init__(self, axes: Sequence[str]) -> None:
        self.axes = {text: i for i, text in enumerate(axes)}
        self.calls: list[tuple[list[str], bool]] = []

    def encode_texts(self, texts: Sequence[str], use_templates: bool = True) -> np.ndarray:
        self.calls.append((list(texts), use_templates))
        return np.eye(self.dim, dtype=np.float32)[[self.axes[text] for text in texts]]


AXES = ["cat", "dog", "tree", "car", "a photo of a boat"]
# p = sigmoid(10 * (cos - best cos)): the best label(s) 0.5, a label 0.7 under the best cosine 0.001.
TEST_CALIBRATION = Calibration(scale=10.0, bias=0.0, threshold=0.4, source="test")


def image(*axes: int) -> np.ndarray:
    vector = np.zeros(CONTRACT_DIM, dtype=np.float32)
    vector[list(axes)] = 1.0
    return vector / np.linalg.norm(vector)


def scorer(labels: Sequence[str] = ("cat", "dog", "tree"), **options: object) -> TagScorer:
    options.setdefault("calibration", TEST_CALIBRATION)
    return TagScorer(AxisEncoder(AXES), Vocabulary.of(labels), **options)  # type: ignore[arg-type]


def fill(store: VectorStore, vectors: Sequence[np.ndarray], tags: Sequence[list[str]] | None = None) -> list[str]:
    ids = [f"{i:032x}" for i in range(len(vectors))]
    payloads = [{"paths": [f"/photos/{i}.jpg"], **({"tags": tags[i]} if tags else {})} for i in range(len(vectors))]
    store.upsert(ids, np.stack(vectors), payloads)
    return ids


def payloads(store: VectorStore) -> dict[str, dict[str, object]]:
    return {record.id: record.payload for record in store.scroll()}


def test_each_image_gets_exactly_the_labels_near_its_best_one(store: VectorStore) -> None:
    ids = fill(store, [image(0), image(0, 1), image(2), image(3)])
    report = tag_collection(store, scorer(), batch_size=3)
    stored = payloads(store)
    assert [stored[i].get("tags") for i in ids] == [["cat"], ["cat", "dog"], ["tree"], ["cat", "dog", "tree"]]
    assert stored[ids[0]][TAG_SCORES_FIELD] == {"cat": 0.5}
    assert (report.scanned, report.tagged, report.changed, report.batches) == (4, 4, 4, 2)
    assert report.label_counts == {"cat": 3, "dog": 2, "tree": 2}


def test_probabilities_of_two_objects_do_not_share_one_unit() -> None:
    probabilities = scorer().probabilities(np.stack([image(0, 1)]))[0]
    assert probabilities[0] == probabilities[1] == pytest.approx(0.5)
    assert probabilities[2] < 0.001


def test_top_k_and_per_label_thresholds_limit_the_tags() -> None:
    vectors = np.stack([image(0, 1, 2)])
    assert [tag.label for tag in scorer(top_k=2).tags(vectors)[0]] == ["cat", "dog"]
    strict = TagScorer(
        AxisEncoder(AXES),  # type: ignore[arg-type]
        load_vocabulary_text('[{"label": "cat", "threshold": 0.9}, "dog", "tree"]', "json"),
        calibration=TEST_CALIBRATION,
    )
    assert [tag.label for tag in strict.tags(vectors)[0]] == ["dog", "tree"]
    assert scorer(threshold=0.6).tags(vectors) == [[]]


def test_labels_are_embedded_once_in_the_templates_or_with_their_own_prompt() -> None:
    encoder = AxisEncoder(AXES)
    vocabulary = load_vocabulary_text('{"cat": null, "boat": {"prompt": "a photo of a {}"}}', "json")
    boats = TagScorer(encoder, vocabulary, calibration=TEST_CALIBRATION)  # type: ignore[arg-type]
    boats.tags(np.stack([image(4)]))
    assert [tag.label for tag in boats.tags(np.stack([image(4)]))[0]] == ["boat"]
    assert encoder.calls == [(["cat"], True), (["a photo of a boat"], False)]


def test_tagging_with_another_vocabulary_replaces_machine_tags_but_keeps_other_tags(store: VectorStore) -> None:
    ids = fill(store, [image(0, 1), image(0)], tags=[["holiday", "dog"], []])
    tag_collection(store, scorer())
    first = payloads(store)
    assert first[ids[0]]["tags"] == ["holiday", "dog", "cat"]
    assert first[ids[0]][AUTO_TAGS_FIELD] == ["cat"], "dog was a user's tag already"
    store.update_payloads({ids[1]: PayloadUpdate(add={"tags": ("pet",)})})
    tag_collection(store, scorer(("tree", "car")))
    second = payloads(store)
    assert second[ids[0]]["tags"] == ["holiday", "dog", "tree", "car"]
    assert second[ids[1]]["tags"] == ["pet", "tree", "car"]
    assert second[ids[1]][TAG_SCORES_FIELD] == {"tree": 0.5, "car": 0.5}
    tag_collection(store, scorer(("car",), threshold=0.6))  # nothing passes: machine tags go, the others stay
    third = payloads(store)
    assert [third[i]["tags"] for i in ids] == [["holiday", "dog"], ["pet"]]
    assert not any(AUTO_TAGS_FIELD in p or TAG_SCORES_FIELD in p for p in third.values())


def test_should_stop_is_asked_between_batches(store: VectorStore) -> None:
    ids = fill(store, [image(i % 3) for i in range(10)])
    asked: list[int] = []
    seen: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    report = tag_collection(
        store, scorer(), batch_size=3, should_stop=should_stop, on_batch=lambda r: seen.append(r.scanned)
    )
    assert (report.scanned, report.batches, report.stopped, seen) == (6, 2, True, [3, 6])
    stored = payloads(store)
    assert [TAG_SCORES_FIELD in stored[i] for i in ids] == [True] * 6 + [False] * 4
    assert tag_collection(store, scorer(), should_stop=lambda: True).scanned == 0
    finished = tag_collection(store, scorer(), batch_size=5, should_stop=lambda: False)
    assert (finished.scanned, finished.batches, finished.stopped) == (10, 2, False)


def test_tag_records_tags_a_chunk_and_reports_ids_not_stored(store: VectorStore) -> None:
    ids = fill(store, [image(0), image(1), image(2)])
    gone = "f" * 32
    report = tag_records(store, scorer(), [ids[2], gone, ids[0], ids[2]], batch_size=2)
    assert (report.scanned, report.changed, report.missing) == (2, 2, [gone])
    assert [payloads(store)[i].get("tags") for i in ids] == [["cat"], None, ["tree"]]


def test_a_collection_of_another_encoder_is_refused(store: VectorStore) -> None:
    other = AxisEncoder(AXES)
    other.identity = "sha256:other"  # type: ignore[misc]
    with pytest.raises(EncoderMismatch):
        tag_collection(store, TagScorer(other, Vocabulary.of(["cat"])))  # type: ignore[arg-type]


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_export_round_trips_tags_scores_and_untagged_images(store: VectorStore, format: str) -> None:
    ids = fill(store, [image(0, 1), image(2), image(3)], tags=[['x, "quoted"\nline'], [], []])
    store.update_payloads({ids[0]: PayloadUpdate(add={"paths": ("/other/a b.jpg",)})})
    tag_collection(store, scorer(("cat", "dog")))
    store.update_payloads({ids[1]: PayloadUpdate(set={TAG_SCORES_FIELD: None, AUTO_TAGS_FIELD: None, "tags": None})})
    output = io.StringIO()
    assert export_tags(store, format, output) == 3
    exported = {image.id: image for image in read_exported_tags(output.getvalue(), format)}
    assert exported[ids[0]].paths == ("/photos/0.jpg", "/other/a b.jpg")
    assert exported[ids[0]].tags == {'x, "quoted"\nline': None, "cat": 0.5, "dog": 0.5}
    assert exported[ids[1]].tags == {}
    assert exported[ids[2]].tags == {"cat": 0.5, "dog": 0.5}
    if format == "jsonl":
        assert json.loads(output.getvalue().splitlines()[1])["tags"] == []


# ---------------------------------------------------------------- vocabulary files


def load_vocabulary_text(text: str, kind: Literal["json", "text"]) -> Vocabulary:
    return parse_vocabulary(text, kind, "<test>")


def test_text_vocabulary_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# subjects\n\nred  circle\n  dog \n# done\n", encoding="utf-8")
    assert load_vocabulary(path).names == ["red circle", "dog"]


def test_json_vocabulary_in_both_forms_carries_prompts_and_thresholds(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"label": "dog", "prompt": ["a {}", "a puppy"], "threshold": 0.7}, "cat"]))
    mapped = tmp_path / "map.json"
    mapped.write_text(json.dumps({"dog": {"prompt": ["a {}", "a puppy"], "threshold": 0.7}, "cat": None}))
    for path in (listed, mapped):
        dog, cat = load_vocabulary(path).labels
        assert (dog.name, dog.texts(), dog.threshold) == ("dog", ("a dog", "a puppy"), 0.7)
        assert (cat.name, cat.prompts, cat.threshold) == ("cat", (), None)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("dupes.txt", "dog\ncat\n\ndog\n", "dupes.txt, line 4: label 'dog' repeats line 1"),
        ("empty.txt", "# nothing\n\n", "empty.txt: no labels"),
        ("control.txt", "dog\nc\x00at\n", "control.txt, line 2: label 'c\\x00at' contains control characters"),
        ("bad.json", '[\n  "dog",\n  "cat"\n  "cow"\n]', "bad.json, line 4: invalid JSON"),
        (
            "threshold.json",
            '[\n "dog",\n {"label": "cat", "threshold": 2}\n]',
            "threshold.json, line 3: label 'cat': threshold",
        ),
        ("key.json", '{\n "dog": {"promt": "a dog"}\n}', "key.json, line 2: label 'dog': unknown key 'promt'"),
        ("twice.json", '{\n "dog": null,\n "dog": {}\n}', "twice.json, line 3: label 'dog' repeats line 2"),
        ("number.json", '["dog", 7]', "number.json, line 1: an entry is a label or an object, not 7"),
        ("scalar.json", '"dog"', "scalar.json, line 1: JSON must be a list of labels or a mapping"),
        ("nolabel.json", '[{"prompt": "a dog"}]', 'nolabel.json, line 1: an entry has no "label"'),
    ],
)
def test_vocabulary_errors_name_the_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidVocabulary) as raised:
        load_vocabulary(path)
    assert message in str(raised.value)
    assert raised.value.category == "invalid_input"


def test_unreadable_vocabulary_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidVocabulary, match=r"missing\.txt: file not found"):
        load_vocabulary(tmp_path / "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"dog\ncaf\xe9\n")
    with pytest.raises(InvalidVocabulary, match=r"latin\.txt, line 2: is not UTF-8 text"):
        load_vocabulary(latin)


def test_default_vocabulary_lists_a_few_hundred_distinct_photo_subjects() -> None:
    vocabulary = default_vocabulary()
    assert 200 <= len(vocabulary) <= 1000
    assert {"dog", "cat", "beach", "car", "person", "food"} <= set(vocabulary.names)
