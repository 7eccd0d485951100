"""Zero-shot tags for stored images: label vocabularies, calibrated label probabilities, tagging a collection from
its stored vectors (no image is decoded again), and the tag export (JSONL or CSV).

Payload fields written (only through `PayloadUpdate`, never a whole payload):
- `tags`: the image's tags as every reader sees them (`--tag` filters, keyword search). A tagging run adds its
  tags here and removes the tags that the previous run added and this one did not choose again.
- `tag_scores`: {label: probability} of the tags the last tagging run chose (what the export prints).
- `auto_tags`: the labels of `tag_scores` that the tagger itself put into `tags`. A tag that a user or another
  source had added already is not listed, so a later run with another vocabulary never removes it (a tag that
  the tagger added stays the tagger's, even if a user adds it again later).
Re-running with the same scorer writes nothing new (every update is a no-op, and is skipped).
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TextIO

import numpy as np

from indexer.errors import InvalidQuery
from indexer.payloads import Payload, PayloadUpdate
from models import MODELS_DIR
from retriever.errors import EncoderMismatch
from retriever.store import Filter, Manifest, Record, VectorStore

__all__ = [
    "AUTO_TAGS_FIELD",
    "CALIBRATIONS",
    "CANDIDATE_FLOOR",
    "DEFAULT_VOCABULARY_FILE",
    "SHAPES_CLIP_CALIBRATION",
    "TAG_SCORES_FIELD",
    "VERIFY_CANDIDATES",
    "Calibration",
    "ExportedImage",
    "InvalidVocabulary",
    "Label",
    "Tag",
    "TagReport",
    "TagScorer",
    "Verifier",
    "Vocabulary",
    "calibration_for",
    "default_vocabulary",
    "export_tags",
    "fit_calibration",
    "load_vocabulary",
    "parse_vocabulary",
    "read_exported_tags",
    "tag_collection",
    "tag_records",
    "tag_update",
]

TAG_SCORES_FIELD = "tag_scores"
AUTO_TAGS_FIELD = "auto_tags"
DEFAULT_VOCABULARY_FILE = MODELS_DIR / "vocabularies" / "common.txt"
MAX_LABEL_CHARS = 200
SCORE_DIGITS = 4  # stored probabilities are rounded, so a re-run on another machine writes the same values
TEXT_BATCH = 256  # label prompts embedded per forward pass
ExportFormat = Literal["jsonl", "csv"]
EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "csv")
CSV_COLUMNS = ("id", "paths", "tag", "score")


# ---------------------------------------------------------------- vocabularies


class InvalidVocabulary(InvalidQuery):
    """A label vocabulary file that cannot be used; the message names the file and, where it can, the line."""

    def __init__(self, source: str, reason: str, line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"label vocabulary {where}: {reason}")


@dataclass(frozen=True)
class Label:
    """One label: its tag text, optional prompts (a `{}` in a prompt is replaced by the label) and threshold."""

    name: str
    prompts: tuple[str, ...] = ()  # empty: the label itself, inside the encoder's prompt templates
    threshold: float | None = None  # None: the scorer's threshold

    def texts(self) -> tuple[str, ...]:
        return tuple(prompt.replace("{}", self.name) for prompt in self.prompts)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of distinct labels, with where they came from."""

    labels: tuple[Label, ...]
    source: str = "<labels>"

    def __post_init__(self) -> None:
        if not self.labels:
            raise InvalidVocabulary(self.source, "no labels (a text file lists one label per line)")
        seen: set[str] = set()
        for label in self.labels:
            if label.name in seen:
                raise InvalidVocabulary(self.source, f"label {label.name!r} is listed twice")
            seen.add(label.name)

    @classmethod
    def of(cls, names: Iterable[str], source: str = "<labels>") -> Vocabulary:
        """A vocabulary of plain labels (no prompts or thresholds of their own)."""
        return cls(tuple(Label(_checked_name(name, source, None)) for name in names), source)

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)


def load_vocabulary(path: str | Path) -> Vocabulary:
    """A vocabulary from a file: JSON when it ends in .json, else text with one label per line (`#` comments)."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidVocabulary(source, "file not found") from None
    except IsADirectoryError:
        raise InvalidVocabulary(source, "is a directory, not a label file") from None
    except OSError as error:
        raise InvalidVocabulary(source, f"cannot be read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InvalidVocabulary(source, "is not UTF-8 text", line) from None
    kind: Literal["json", "text"] = "json" if Path(path).suffix.lower() == ".json" else "text"
    return parse_vocabulary(text, kind, source)


def default_vocabulary() -> Vocabulary:
    """The shipped vocabulary of common photo subjects (models/vocabularies/common.txt)."""
    return load_vocabulary(DEFAULT_VOCABULARY_FILE)


def parse_vocabulary(text: str, kind: Literal["json", "text"] = "text", source: str = "<labels>") -> Vocabulary:
    """A vocabulary from text. JSON: a list of labels or {"label", "prompt"?, "threshold"?} objects, or a mapping
    label -> {"prompt"?, "threshold"?} (or null); "prompt" is a string or a list of strings."""
    if kind == "json":
        return Vocabulary(tuple(_json_labels(text, source)), source)
    labels: list[Label] = []
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name = _checked_name(stripped, source, number)
        if name in lines:
            raise InvalidVocabulary(source, f"label {name!r} repeats line {lines[name]}", number)
        lines[name] = number
        labels.append(Label(name))
    return Vocabulary(tuple(labels), source)


def _checked_name(raw: object, source: str, line: int | None) -> str:
    if not isinstance(raw, str):
        raise InvalidVocabulary(source, f"a label is a string, not {type(raw).__name__} {raw!r}", line)
    name = " ".join(raw.split())  # tags are matched exactly: one spelling of the spaces
    if not name:
        raise InvalidVocabulary(source, "empty label", line)
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise InvalidVocabulary(source, f"label {name!r} contains control characters", line)
    if len(name) > MAX_LABEL_CHARS:
        raise InvalidVocabulary(source, f"label {name[:40]!r}... is longer than {MAX_LABEL_CHARS} characters", line)
    return name


def _json_labels(text: str, source: str) -> Iterator[Label]:
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidVocabulary(source, f"invalid JSON: {error.msg} (column {error.colno})", error.lineno) from None
    items = _json_items(text)
    if items is None:
        raise InvalidVocabulary(source, "JSON must be a list of labels or a mapping of label -> options", 1)
    lines: dict[str, int] = {}
    for line, key, value in items:
        if key is None:  # a list entry: "label" or {"label": ..., "prompt": ..., "threshold": ...}
            if isinstance(value, str):
                name, options = value, {}
            elif isinstance(value, dict):
                if "label" not in value:
                    raise InvalidVocabulary(source, 'an entry has no "label"', line)
                name, options = value["label"], {k: v for k, v in value.items() if k != "label"}
            else:
                raise InvalidVocabulary(source, f"an entry is a label or an object, not {json.dumps(value)}", line)
        else:
            name = key
            if value is not None and not isinstance(value, dict):
                raise InvalidVocabulary(
                    source, f'the options of {key!r} are an object {{"prompt", "threshold"}} or null', line
                )
            options = value or {}
        label = _checked_name(name, source, line)
        if label in lines:
            raise InvalidVocabulary(source, f"label {label!r} repeats line {lines[label]}", line)
        lines[label] = line
        yield _label_with_options(label, options, source, line)


def _label_with_options(name: str, options: Mapping[str, Any], source: str, line: int) -> Label:
    unknown = sorted(set(options) - {"prompt", "threshold"})
    if unknown:
        raise InvalidVocabulary(source, f"label {name!r}: unknown key {unknown[0]!r} (known: prompt, threshold)", line)
    prompt = options.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if prompts is not None and (
        not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise InvalidVocabulary(source, f"label {name!r}: prompt is a non-empty string or list of them", line)
    threshold = options.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0
    ):
        raise InvalidVocabulary(source, f"label {name!r}: threshold is a probability in [0, 1], not {threshold}", line)
    return Label(name, tuple(p.strip() for p in prompts or ()), None if threshold is None else float(threshold))


def _json_items(text: str) -> list[tuple[int, str | None, Any]] | None:
    """(line, key or None, value) of each top-level entry of a valid JSON list or object; None for other JSON.

    Scanned element by element so that errors can name the line of the entry (json gives positions only for
    syntax errors); an object's repeated keys are all kept, for the duplicate check."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n\ufeff":
            i += 1
        return i

    i = skip(0)
    if i >= len(text) or text[i] not in "[{":
        return None
    closer = "]" if text[i] == "[" else "}"
    items: list[tuple[int, str | None, Any]] = []
    i = skip(i + 1)
    while text[i] != closer:
        key: str | None = None
        if closer == "}":
            key, i = decoder.raw_decode(text, i)
            i = skip(skip(i) + 1)  # the colon
        start = i
        value, i = decoder.raw_decode(text, i)
        items.append((text.count("\n", 0, start) + 1, key, value))
        i = skip(i)
        if text[i] == ",":
            i = skip(i + 1)
    return items


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Label probabilities from cosines: p = sigmoid(scale * (cos(image, label) - best cosine of the image) + bias).

    Each label gets its own probability (they need not sum to 1, so a scene of two objects can have both near the
    top), measured against the image's best label: cosines of one image shift together with the image, and what
    the model says is which labels come near its best one. `threshold` is the cut fitted with it.
    """

    scale: float
    bias: float
    threshold: float
    source: str  # how it was obtained

    def probabilities(self, cosines: np.ndarray) -> np.ndarray:
        """(images, labels) cosines -> (images, labels) probabilities."""
        relative = cosines - cosines.max(axis=1, keepdims=True)
        return (1.0 / (1.0 + np.exp(-(self.scale * relative + self.bias)))).astype(np.float32)


# Fitted by `fit_calibration` on the shapes-world VALIDATION split (scenes 0..1499 of seed 0, rendered at 64 px),
# with the 24 object labels `{colour} {shape}` inside the service's default prompt templates ("a photo of {}." ...);
# the test split is never used for it. The threshold is the one that maximises micro-F1 on those scenes.
# tests/retriever/test_tagging.py fits it again from the same scenes and checks these values.
SHAPES_CLIP_CALIBRATION = Calibration(
    scale=28.91,
    bias=0.651,
    threshold=0.37,
    source="fitted on 1500 shapes-world validation scenes (seed 0, 64 px), 24 object labels",
)
CALIBRATIONS: dict[str, Calibration] = {
    # models/shapes-clip/open_clip_model.safetensors
    "sha256:0bab13912c6556a57a9c303f876511a5a4c2accc0ba917033087276dc740a2e5": SHAPES_CLIP_CALIBRATION,
}
# Without a fit: the model's own logit scale, the best label at p = 0.5, and a cut of 1/3 (a label within
# ln(2) / scale of the best cosine). The shipped model's fit is of that order: scale 28.9 against its logit scale
# of 18.3, the best label at p = 0.66, a cut of 0.37.
UNCALIBRATED_THRESHOLD = 1 / 3
DEFAULT_LOGIT_SCALE = 100.0  # open_clip's initial and usual trained value


def calibration_for(encoder: TextEncoder) -> Calibration:
    """The fitted calibration of the encoder's weights, or one from the model's logit scale."""
    known = CALIBRATIONS.get(encoder.identity)
    if known is not None:
        return known
    scale = DEFAULT_LOGIT_SCALE
    logit_scale = getattr(getattr(encoder, "model", None), "logit_scale", None)
    if logit_scale is not None:
        scale = float(math.exp(float(logit_scale.detach().float().cpu().item())))
    return Calibration(scale, 0.0, UNCALIBRATED_THRESHOLD, f"uncalibrated: the model's logit scale {scale:.1f}")


def fit_calibration(cosines: np.ndarray, truth: np.ndarray, source: str = "fitted") -> Calibration:
    """Fit scale and bias by maximum likelihood (logistic regression on the relative cosine, Newton's method) to
    known labels (`truth`: boolean (images, labels)), then the threshold that maximises micro-F1 on the same data."""
    relative = (cosines - cosines.max(axis=1, keepdims=True)).ravel().astype(np.float64)
    y = np.asarray(truth, dtype=np.float64).ravel()
    features = np.stack([relative, np.ones_like(relative)], axis=1)
    weights = np.zeros(2)
    ridge = 1e-6 * np.eye(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-features @ weights))
        gradient = features.T @ (p - y) / len(y)
        hessian = (features * (p * (1 - p))[:, None]).T @ features / len(y) + ridge
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-9:
            break
    fitted = Calibration(float(weights[0]), float(weights[1]), 0.5, source)
    probabilities = fitted.probabilities(cosines)
    positives = np.asarray(truth, dtype=bool)
    best, cut = -1.0, 0.5
    for candidate in np.round(np.arange(0.02, 0.99, 0.01), 2):
        chosen = probabilities >= candidate
        f1 = 2 * (chosen & positives).sum() / max(chosen.sum() + positives.sum(), 1)
        if f1 > best:
            best, cut = float(f1), float(candidate)
    return replace(fitted, threshold=cut)


# ---------------------------------------------------------------- scoring


class TextEncoder(Protocol):
    """What the scorer needs of the collection's encoder (indexer.encoder.ClipEncoder is one)."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode_texts(self, texts: Sequence[str], use_templates: bool = True) -> np.ndarray: ...


def _chunked(items: list[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    for start in range(0, len(items), TEXT_BATCH):
        yield items[start : start + TEXT_BATCH]


# With verification (a generative model confirms each tag): how many labels per image are put to it, and the
# probability under which a label is not worth asking about.
VERIFY_CANDIDATES = 6
CANDIDATE_FLOOR = 0.01

# Confirms candidate tags of stored images: records and their candidates in, per image the confirmed ones out, or
# None where it could not look (the image is gone): that payload is left as it was and the id reported.
Verifier = Callable[[Sequence[Record], list[list["Tag"]]], list[list["Tag"] | None]]


class Tag(NamedTuple):
    label: str
    score: float  # calibrated probability that the label applies


class TagScorer:
    """Scores stored image vectors against a vocabulary; label embeddings are computed once, on first use."""

    def __init__(
        self,
        encoder: TextEncoder,
        vocabulary: Vocabulary,
        threshold: float | None = None,
        top_k: int | None = 5,
        calibration: Calibration | None = None,
    ) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidQuery(f"tag threshold is a probability in [0, 1], got {threshold}")
        if top_k is not None and top_k < 1:
            raise InvalidQuery(f"top_k must be at least 1, got {top_k}")
        self.encoder = encoder
        self.vocabulary = vocabulary
        self._threshold = threshold
        self.top_k = top_k
        self._calibration = calibration
        self._lock = threading.Lock()
        self._embeddings: np.ndarray | None = None

    @property
    def calibration(self) -> Calibration:
        if self._calibration is None:
            self._calibration = calibration_for(self.encoder)
        return self._calibration

    @property
    def threshold(self) -> float:
        """The cut for labels without their own: the one given, else the calibration's."""
        return self.calibration.threshold if self._threshold is None else self._threshold

    @property
    def thresholds(self) -> np.ndarray:
        """Each label's cut (its own, else the scorer's)."""
        return np.array(
            [self.threshold if label.threshold is None else label.threshold for label in self.vocabulary.labels],
            dtype=np.float32,
        )

    @property
    def label_embeddings(self) -> np.ndarray:
        """(labels, dim) L2-normalised: each label's prompts averaged, or the label in the encoder's templates."""
        if self._embeddings is None:
            with self._lock:
                if self._embeddings is None:
                    self._embeddings = self._embed_labels()
        return self._embeddings

    def _embed_labels(self) -> np.ndarray:
        labels = self.vocabulary.labels
        sums: np.ndarray | None = None
        plain = [i for i, label in enumerate(labels) if not label.prompts]
        prompted = [(i, text) for i, label in enumerate(labels) for text in label.texts()]
        jobs = [(chunk, True) for chunk in _chunked([(i, labels[i].name) for i in plain])]
        jobs += [(chunk, False) for chunk in _chunked(prompted)]
        for chunk, use_templates in jobs:
            vectors = self.encoder.encode_texts([text for _, text in chunk], use_templates=use_templates)
            if sums is None:
                sums = np.zeros((len(labels), vectors.shape[1]), dtype=np.float64)
            np.add.at(sums, [i for i, _ in chunk], vectors)  # a label's prompts are averaged
        assert sums is not None  # a vocabulary is never empty
        return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def check_collection(self, manifest: Manifest) -> None:
        """Raise EncoderMismatch unless the collection was built by this scorer's encoder."""
        manifest.check_encoder(self.encoder.name, self.encoder.identity, self.encoder.dim)

    def cosines(self, vectors: np.ndarray) -> np.ndarray:
        """(images, dim) stored vectors -> (images, labels) cosines."""
        array = np.asarray(vectors, dtype=np.float32)
        embeddings = self.label_embeddings
        if array.ndim != 2 or array.shape[1] != embeddings.shape[1]:
            raise EncoderMismatch(
                f"image vectors of shape {array.shape} do not match the labels' dim {embeddings.shape[1]} "
                f"of encoder {self.encoder.name!r}"
            )
        if not np.isfinite(array).all():
            raise InvalidQuery("image vectors contain NaN or infinite values")
        return array @ embeddings.T

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(images, dim) stored vectors -> (images, labels) calibrated probabilities."""
        return self.calibration.probabilities(self.cosines(vectors))

    def tags(self, vectors: np.ndarray) -> list[list[Tag]]:
        """Per image: the labels at or over their threshold, most probable first, at most top_k."""
        return self._select(vectors, self.thresholds, self.top_k)

    def candidates(
        self, vectors: np.ndarray, count: int = VERIFY_CANDIDATES, floor: float = CANDIDATE_FLOOR
    ) -> list[list[Tag]]:
        """Per image: the `count` most probable labels at or over `floor`, for a second opinion to confirm.

        Recall matters here, not precision: on shapes-world validation scenes the shipped CLIP's 6 best labels hold
        0.99 of the objects, its labels over the threshold 0.70.
        """
        return self._select(vectors, np.full(len(self.vocabulary), floor, dtype=np.float32), count)

    def _select(self, vectors: np.ndarray, thresholds: np.ndarray, top_k: int | None) -> list[list[Tag]]:
        if len(vectors) == 0:
            return []
        probabilities = self.probabilities(vectors)
        chosen = probabilities >= thresholds
        names = self.vocabulary.names
        result = []
        for row, keep in zip(probabilities, chosen, strict=True):
            indices = np.flatnonzero(keep)
            indices = indices[np.argsort(-row[indices], kind="stable")][:top_k]
            result.append([Tag(names[i], round(float(row[i]), SCORE_DIGITS)) for i in indices])
        return result


# ---------------------------------------------------------------- writing tags


def tag_update(payload: Payload, tags: Sequence[Tag]) -> PayloadUpdate:
    """The change that makes `tags` this image's machine tags (see the module docstring): the previous run's own
    tags that are not chosen again leave `tags`, tags that users or other sources added stay."""
    chosen = [tag.label for tag in tags]
    previous_auto = list(payload.get(AUTO_TAGS_FIELD) or [])
    others = set(payload.get("tags") or []) - set(previous_auto)
    auto = [label for label in chosen if label not in others]
    dropped = tuple(label for label in previous_auto if label not in set(chosen))
    return PayloadUpdate(
        set={TAG_SCORES_FIELD: {tag.label: tag.score for tag in tags} or None, AUTO_TAGS_FIELD: auto or None},
        add={"tags": tuple(auto)} if auto else {},
        remove={"tags": dropped} if dropped else {},
    )


@dataclass
class TagReport:
    """What a tagging run did."""

    scanned: int = 0  # images scored
    tagged: int = 0  # images that got at least one tag
    changed: int = 0  # payloads written (the others held these tags already)
    missing: list[str] = field(default_factory=list)  # ids asked for (tag_records) that are not stored
    unverified: list[str] = field(default_factory=list)  # ids whose image the verifier could not load (untouched)
    label_counts: dict[str, int] = field(default_factory=dict)  # label -> images tagged with it
    batches: int = 0
    stopped: bool = False  # should_stop said so before the scan ended
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_collection(
    store: VectorStore,
    scorer: TagScorer,
    batch_size: int = 256,
    filter: Filter | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[TagReport], None] | None = None,
    verify: Verifier | None = None,
) -> TagReport:
    """Tag every stored image (matching filter) from its stored vector, writing batch by batch (with `verify`,
    only the candidates it confirms, as in tag_records).

    `should_stop` is asked before each batch (a cancelled job writes nothing more); `on_batch` gets a snapshot of
    the report after each. Committed payload updates are durable; the caller saves the store as after any write.
    """
    _check_batch_size(batch_size)
    scorer.check_collection(store.manifest)
    records = store.scroll(filter, batch_size=batch_size, with_vectors=True)
    batches: Iterator[tuple[list[Record], list[str]]] = ((batch, []) for batch in _batched(records, batch_size))
    return _run(store, scorer, batches, should_stop, on_batch, verify)


def tag_records(
    store: VectorStore,
    scorer: TagScorer,
    ids: Sequence[str],
    batch_size: int = 256,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[TagReport], None] | None = None,
    verify: Verifier | None = None,
) -> TagReport:
    """Tag the stored images of `ids` (a job's chunk) as tag_collection does; ids not stored are reported.
    With `verify`, each image's candidates (TagScorer.candidates) are put to it and only what it confirms is kept."""
    _check_batch_size(batch_size)
    scorer.check_collection(store.manifest)
    unique = list(dict.fromkeys(ids))

    def batches() -> Iterator[tuple[list[Record], list[str]]]:
        for start in range(0, len(unique), batch_size):
            wanted = unique[start : start + batch_size]
            found = store.get(wanted, with_vectors=True)
            known = {record.id for record in found}
            yield found, [image_id for image_id in wanted if image_id not in known]

    return _run(store, scorer, batches(), should_stop, on_batch, verify)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InvalidQuery(f"tagging batch_size must be at least 1, got {batch_size}")


def _batched(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run(
    store: VectorStore,
    scorer: TagScorer,
    batches: Iterator[tuple[list[Record], list[str]]],  # (records found, ids asked for and not stored)
    should_stop: Callable[[], bool] | None,
    on_batch: Callable[[TagReport], None] | None,
    verify: Verifier | None = None,
) -> TagReport:
    started = time.perf_counter()
    report = TagReport()
    counts: Counter[str] = Counter()
    # The next batch is read before should_stop is asked, so a run that has finished is never reported stopped.
    pending = next(batches, None)
    while pending is not None:
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        records, missing = pending
        if records:
            _tag_batch(store, scorer, records, report, counts, verify)
        report.missing.extend(missing)
        report.batches += 1
        report.label_counts = dict(counts)
        report.seconds = time.perf_counter() - started
        if on_batch is not None:
            snapshot = replace(report, missing=list(report.missing), unverified=list(report.unverified))
            on_batch(replace(snapshot, label_counts=dict(counts)))
        pending = next(batches, None)
    report.label_counts = dict(counts)
    report.seconds = time.perf_counter() - started
    return report


def _tag_batch(
    store: VectorStore,
    scorer: TagScorer,
    batch: list[Record],
    report: TagReport,
    counts: Counter[str],
    verify: Verifier | None = None,
) -> None:
    without = [record.id for record in batch if record.vector is None]
    if without:
        raise InvalidQuery(f"the store returned no vectors for {len(without)} images (e.g. {without[0]})")
    vectors = np.stack([record.vector for record in batch if record.vector is not None])
    chosen: Sequence[list[Tag] | None]
    chosen = scorer.tags(vectors) if verify is None else verify(batch, scorer.candidates(vectors))
    updates: dict[str, PayloadUpdate] = {}
    for record, tags in zip(batch, chosen, strict=True):
        if tags is None:
            report.unverified.append(record.id)
            continue
        counts.update(tag.label for tag in tags)
        report.tagged += bool(tags)
        update = tag_update(record.payload, tags)
        if update.apply(record.payload) != record.payload:
            updates[record.id] = update
    if updates:
        store.update_payloads(updates)
    report.scanned += len(batch)
    report.changed += len(updates)


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportedImage:
    """One image in a tag export: its tags with their scores (None for tags no tagging run scored)."""

    id: str
    paths: tuple[str, ...]
    tags: dict[str, float | None]


def _exported(payload: Payload, image_id: str) -> ExportedImage:
    scores = payload.get(TAG_SCORES_FIELD) or {}
    tags = {str(tag): (float(scores[tag]) if tag in scores else None) for tag in payload.get("tags") or []}
    return ExportedImage(image_id, tuple(str(p) for p in payload.get("paths") or []), tags)


def export_tags(
    store: VectorStore,
    format: str,
    output: TextIO,
    filter: Filter | None = None,
    batch_size: int = 1000,
) -> int:
    """Write every image's id, paths and tags with scores; returns the number of images written.

    jsonl: one object per image, {"id", "paths": [...], "tags": [{"tag", "score"}]}.
    csv: columns id, paths, tag, score: one row per tag of an image (one row with an empty tag for an image
    without tags); `paths` holds every path of the image, one per line of the cell.
    """
    if format not in EXPORT_FORMATS:
        raise InvalidQuery(f"unknown tag export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    writer = csv.writer(output, lineterminator="\n") if format == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    written = 0
    for record in store.scroll(filter, batch_size=batch_size):
        image = _exported(record.payload, record.id)
        if writer is None:
            tags = [{"tag": tag, "score": score} for tag, score in image.tags.items()]
            output.write(json.dumps({"id": image.id, "paths": list(image.paths), "tags": tags}) + "\n")
        else:
            paths = "\n".join(image.paths)
            rows = image.tags.items() or [("", None)]
            for tag, score in rows:
                writer.writerow((image.id, paths, tag, "" if score is None else repr(score)))
        written += 1
    return written


def read_exported_tags(text: str, format: str) -> list[ExportedImage]:
    """The images of a tag export written by export_tags, in its order."""
    if format == "jsonl":
        images = []
        for line in text.splitlines():
            if line.strip():
                data = json.loads(line)
                tags = {entry["tag"]: entry["score"] for entry in data["tags"]}
                images.append(ExportedImage(data["id"], tuple(data["paths"]), tags))
        return images
    if format == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise InvalidQuery(f"a tag export in CSV has the columns {', '.join(CSV_COLUMNS)}")
        by_id: dict[str, ExportedImage] = {}
        for row in reader:
            image = by_id.setdefault(
                row["id"], ExportedImage(row["id"], tuple(row["paths"].split("\n")) if row["paths"] else (), {})
            )
            if row["tag"]:
                image.tags[row["tag"]] = float(row["score"]) if row["score"] else None
        return list(by_id.values())
    raise InvalidQuery(f"unknown tag export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
