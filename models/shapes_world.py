"""The shapes world: seeded scenes of coloured shapes, their renderings, captions, queries and splits.

Vocabulary, colours, sizes, the relation rule and the caption grammar follow the shapes-world page
(SHAPES_WORLD.md) exactly, so that scenes rendered independently from that page fairly test the shipped
models. Scenes are structures in normalised coordinates (x right, y down, 0..1 of the canvas side), so one
scene renders at any canvas size from 64 px up. Training, tests, the demo and `vlsearch eval` all use this.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
COLOUR_TOLERANCE = 20  # each channel of a fill lies within this of its colour's anchor
SIZES: tuple[str, ...] = ("small", "large")
SIZE_DIAMETERS: dict[str, tuple[float, float]] = {"small": (0.15, 0.22), "large": (0.30, 0.40)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}
RELATION_MIN_OFFSET = 0.15  # a relation holds when centres differ by at least this on its axis
ALIGNED_MAX_OFFSET = 0.05  # otherwise offsets stay under this, so no relation is borderline
BACKGROUND_RANGE = (225, 255)
MIN_CANVAS = 64

CAPTION_KINDS: tuple[str, ...] = ("object", "attribute", "relation", "sized_relation")
QUERY_KINDS: tuple[str, ...] = ("object", "attribute", "relation")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
WORLD_SEED = 0  # fixes the held-out combinations the shipped models were trained without

_EDGE_MARGIN = 0.02  # objects keep this far from the canvas border
_GAP = 0.03  # bounding boxes of two objects stay this far apart on some axis, so shapes never touch
_SUPERSAMPLE_SIDE = 512  # draw at least this large, then box-average down: clean edges even at 64 px
_TWO_OBJECTS_PROBABILITY = 0.7
_HELD_OUT_FRACTION = 0.1


class CaptionError(ValueError):
    """Text that is not a caption of the shapes-world grammar; the message quotes it."""


@dataclass(frozen=True)
class SceneObject:
    """One filled shape; it fits in a `diameter` x `diameter` box around `centre` (normalised)."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    diameter: float
    rgb: RGB  # the fill actually drawn

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "centre": list(self.centre),
                "diameter": self.diameter, "rgb": list(self.rgb)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        """The object that `to_dict` wrote."""
        cx, cy = data["centre"]
        r, g, b = data["rgb"]
        return cls(data["shape"], data["colour"], data["size"], (float(cx), float(cy)),
                   float(data["diameter"]), (int(r), int(g), int(b)))


class Relation(NamedTuple):
    """`objects[subject]` is `name` `objects[target]` (indices into the scene's objects)."""

    subject: int
    name: str
    target: int


def relations_between(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations that hold with `a` as subject and `b` as target, by the centre-offset rule."""
    dx = b.centre[0] - a.centre[0]
    dy = b.centre[1] - a.centre[1]
    held = []
    if dx >= RELATION_MIN_OFFSET:
        held.append("left of")
    if -dx >= RELATION_MIN_OFFSET:
        held.append("right of")
    if dy >= RELATION_MIN_OFFSET:  # y grows downwards, so a larger y is lower
        held.append("above")
    if -dy >= RELATION_MIN_OFFSET:
        held.append("below")
    return held


@dataclass(frozen=True)
class Scene:
    """One or two objects on a flat background; no two objects share both colour and shape."""

    objects: tuple[SceneObject, ...]
    background: RGB

    def relations(self) -> list[Relation]:
        """Every relation that holds, stated from either object."""
        return [Relation(i, name, j)
                for i, a in enumerate(self.objects) for j, b in enumerate(self.objects) if i != j
                for name in relations_between(a, b)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: objects, background, and the relations that hold (for readers; not read back)."""
        return {"objects": [o.to_dict() for o in self.objects], "background": list(self.background),
                "relations": [list(r) for r in self.relations()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """The scene that `to_dict` wrote."""
        r, g, b = data["background"]
        return cls(tuple(SceneObject.from_dict(o) for o in data["objects"]), (int(r), int(g), int(b)))


# ---------------------------------------------------------------- generation

def _offsets_are_clear(a: SceneObject, b: SceneObject) -> bool:
    """Every axis offset is either clearly aligned or clearly a relation, and the shapes do not touch."""
    dx = abs(a.centre[0] - b.centre[0])
    dy = abs(a.centre[1] - b.centre[1])
    if any(ALIGNED_MAX_OFFSET <= d < RELATION_MIN_OFFSET for d in (dx, dy)):
        return False
    apart = (a.diameter + b.diameter) / 2 + _GAP
    return dx >= apart or dy >= apart


def _sample_object(rng: np.random.Generator, shape: str, colour: str, size: str) -> SceneObject:
    low, high = SIZE_DIAMETERS[size]
    diameter = float(rng.uniform(low, high))
    lo, hi = diameter / 2 + _EDGE_MARGIN, 1 - diameter / 2 - _EDGE_MARGIN
    centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    jitter = rng.integers(-COLOUR_TOLERANCE, COLOUR_TOLERANCE + 1, size=3)
    r, g, b = (int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    return SceneObject(shape, colour, size, centre, diameter, (r, g, b))


def _sample_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    return (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(SIZES)))


def sample_scene(rng: np.random.Generator,
                 two_objects_probability: float = _TWO_OBJECTS_PROBABILITY) -> Scene:
    """A random scene of one or two objects drawn from the whole world (no split restrictions)."""
    low, high = BACKGROUND_RANGE
    r, g, b = (int(v) for v in rng.integers(low, high + 1, size=3))
    first = _sample_object(rng, *_sample_kind(rng))
    if rng.random() >= two_objects_probability:
        return Scene((first,), (r, g, b))
    while True:
        shape, colour, size = _sample_kind(rng)
        if (shape, colour) == (first.shape, first.colour):
            continue
        for _ in range(200):  # two large objects sometimes need several tries to fit apart
            second = _sample_object(rng, shape, colour, size)
            if _offsets_are_clear(first, second):
                return Scene((first, second), (r, g, b))


# ---------------------------------------------------------------- rendering

def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy = obj.centre[0] * side, obj.centre[1] * side
    half = obj.diameter * side / 2
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=obj.rgb)
    elif obj.shape == "triangle":  # apex at the top centre, base along the bottom of the box
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=obj.rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 256) -> Image.Image:
    """The scene as a `size` x `size` RGB image (size >= 64), drawn supersampled so edges are antialiased."""
    if size < MIN_CANVAS:
        raise ValueError(f"canvas side {size} px is under the shapes world's minimum of {MIN_CANVAS} px")
    # From 2048 px up a pixel is too small for jagged edges to show, and 2x would cost 4x the memory.
    factor = 1 if size >= 2048 else max(2, math.ceil(_SUPERSAMPLE_SIDE / size))
    side = size * factor
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return image.reduce(factor)  # box average: exact area coverage at the target size


# ---------------------------------------------------------------- captions

@dataclass(frozen=True)
class ObjectPhrase:
    """`a [size] colour shape`; a phrase without a size matches either size."""

    colour: str
    shape: str
    size: str | None = None

    @property
    def text(self) -> str:
        """The phrase as the grammar writes it."""
        words = ["a", self.size, self.colour, self.shape] if self.size else ["a", self.colour, self.shape]
        return " ".join(words)

    def matches(self, obj: SceneObject) -> bool:
        """Whether the phrase describes `obj`."""
        return (obj.colour, obj.shape) == (self.colour, self.shape) and self.size in (None, obj.size)


@dataclass(frozen=True)
class Caption:
    """A caption of the grammar: one object phrase, or two joined by a relation."""

    subject: ObjectPhrase
    relation: str | None = None
    target: ObjectPhrase | None = None

    def __post_init__(self) -> None:
        if (self.relation is None) != (self.target is None):
            raise ValueError("a caption has both a relation and a target, or neither")

    @property
    def text(self) -> str:
        """The caption as the grammar writes it."""
        if self.relation is None or self.target is None:
            return self.subject.text
        return f"{self.subject.text} {self.relation} {self.target.text}"

    @property
    def kind(self) -> str:
        """One of CAPTION_KINDS: object, attribute (sized object), relation, sized_relation."""
        if self.target is None:
            return "attribute" if self.subject.size else "object"
        return "sized_relation" if self.subject.size or self.target.size else "relation"


def object_phrase(obj: SceneObject, with_size: bool) -> ObjectPhrase:
    """The phrase naming `obj`, with or without its size."""
    return ObjectPhrase(obj.colour, obj.shape, obj.size if with_size else None)


def _parse_phrase(words: list[str], text: str) -> tuple[ObjectPhrase, list[str]]:
    if len(words) < 3 or words[0] != "a":
        raise CaptionError(f"not a shapes-world caption: {text!r} (expected 'a [size] colour shape')")
    size = words[1] if words[1] in SIZES else None
    rest = words[2:] if size else words[1:]
    if len(rest) < 2 or rest[0] not in COLOURS or rest[1] not in SHAPES:
        raise CaptionError(f"not a shapes-world caption: {text!r} (expected 'a [size] colour shape')")
    return ObjectPhrase(rest[0], rest[1], size), rest[2:]


def parse_caption(text: str) -> Caption:
    """Parse a caption of the grammar (case and spacing are free); raises CaptionError on anything else."""
    words = text.lower().split()
    subject, rest = _parse_phrase(words, text)
    if not rest:
        return Caption(subject)
    for relation in RELATIONS:
        n = len(relation.split())
        if rest[:n] == relation.split():
            target, tail = _parse_phrase(rest[n:], text)
            if tail:
                break
            return Caption(subject, relation, target)
    raise CaptionError(f"not a shapes-world caption: {text!r} (expected 'a colour shape RELATION a colour "
                       f"shape', RELATION one of {', '.join(RELATIONS)})")


def caption_is_true(scene: Scene, caption: str | Caption) -> bool:
    """Whether the scene shows what the caption says: its objects exist and, if given, the relation holds."""
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    if parsed.relation is None or parsed.target is None:
        return any(parsed.subject.matches(o) for o in scene.objects)
    objects = scene.objects
    return any(parsed.subject.matches(objects[r.subject]) and parsed.target.matches(objects[r.target])
               for r in scene.relations() if r.name == parsed.relation)


def true_captions(scene: Scene, kinds: Iterable[str] = CAPTION_KINDS) -> list[str]:
    """Every true caption of the given kinds: each object with and without size, each relation both ways."""
    wanted = set(kinds)
    unknown = wanted - set(CAPTION_KINDS)
    if unknown:
        raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {', '.join(CAPTION_KINDS)}")
    captions = [Caption(object_phrase(o, sized)) for o in scene.objects for sized in (False, True)]
    for r in scene.relations():
        a, b = scene.objects[r.subject], scene.objects[r.target]
        captions += [Caption(object_phrase(a, sa), r.name, object_phrase(b, sb))
                     for sa in (False, True) for sb in (False, True)]
    return sorted({c.text for c in captions if c.kind in wanted})


def complete_captions(scene: Scene) -> list[str]:
    """The true captions that mention every object of the scene (what a captioner should say)."""
    kinds = ("object", "attribute") if len(scene.objects) == 1 else ("relation", "sized_relation")
    return true_captions(scene, kinds)


def caption_is_complete(scene: Scene, text: str) -> bool:
    """A fully correct caption: it parses, names every object (colour and shape, any size said is right) and,
    of two objects, states a relation that holds."""
    try:
        return parse_caption(text).text in complete_captions(scene)
    except CaptionError:
        return False


# ---------------------------------------------------------------- queries

def queries(kind: str) -> list[str]:
    """Every query of a kind over the whole vocabulary: object (24), attribute (48) or relation (2208)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if kind == "object":
        return [ObjectPhrase(c, s).text for c, s in pairs]
    if kind == "attribute":
        return [ObjectPhrase(c, s, z).text for z in SIZES for c, s in pairs]
    if kind == "relation":
        return [Caption(ObjectPhrase(*a), rel, ObjectPhrase(*b)).text
                for a in pairs for rel in RELATIONS for b in pairs if a != b]
    raise ValueError(f"unknown query kind {kind!r}; known: {', '.join(QUERY_KINDS)}")


def relevance_matrix(query_texts: Sequence[str], scenes: Sequence[Scene]) -> np.ndarray:
    """Boolean (queries x scenes): True where the scene is relevant to the query (the query is true of it)."""
    truths = [set(true_captions(s)) for s in scenes]
    canonical = [parse_caption(q).text for q in query_texts]
    matrix = np.array([[q in t for t in truths] for q in canonical], dtype=bool)
    return matrix.reshape(len(canonical), len(scenes))


def hard_negatives(caption: str | Caption) -> list[str]:
    """For a relation caption: itself with colours swapped, with shapes swapped, with relation inverted."""
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    if parsed.relation is None or parsed.target is None:
        raise ValueError(f"hard negatives are defined for relation captions, not {parsed.text!r}")
    a, b, rel = parsed.subject, parsed.target, parsed.relation
    variants = [
        Caption(ObjectPhrase(b.colour, a.shape, a.size), rel, ObjectPhrase(a.colour, b.shape, b.size)),
        Caption(ObjectPhrase(a.colour, b.shape, a.size), rel, ObjectPhrase(b.colour, a.shape, b.size)),
        Caption(a, INVERSE_RELATION[rel], b),
    ]
    # Swapping equal colours (or shapes) gives the caption back, which is no negative.
    return [v.text for v in variants if v.text != parsed.text]


def hard_negatives_for(scene: Scene, caption: str | Caption) -> list[str]:
    """The hard negatives of a relation caption that are false for the scene."""
    return [n for n in hard_negatives(caption) if not caption_is_true(scene, n)]


# ---------------------------------------------------------------- questions (visual question answering)

QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "exists", "relation", "what_relation")
YES_NO_KINDS: tuple[str, ...] = ("exists", "relation")
# Every word a question or an answer of the grammar uses beyond the caption vocabulary.
QUESTION_WORDS: tuple[str, ...] = (
    "what", "colour", "is", "the", "shape", "object", "size", "how", "many", "shapes", "are", "there",
    "one", "two", "yes", "no", "nothing", "?",
)
_COUNT_WORDS = ("one", "two")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


@dataclass(frozen=True)
class Question:
    """One question of the grammar about a scene, and its exact answer."""

    kind: str
    text: str
    answer: str
    hard: bool = False  # a `no` made by swapping a colour or shape of the scene's, or by inverting a relation


def _the(obj: SceneObject) -> str:
    return f"the {obj.colour} {obj.shape}"


def questions_for(scene: Scene) -> dict[str, list[Question]]:
    """Every question the grammar defines for the scene, by kind (kinds with none are absent).

    `exists` asks for each of the world's colour-shape pairs (yes for the scene's objects; a no is hard when it
    shares the colour or the shape of one of them); `relation` asks each relation for each ordered pair of the
    scene's objects (a no is hard when it inverts a relation that holds).
    """
    objects = scene.objects
    found: dict[str, list[Question]] = {}

    def add(kind: str, text: str, answer: str, hard: bool = False) -> None:
        found.setdefault(kind, []).append(Question(kind, text, answer, hard))

    for shape in SHAPES:
        having = [o for o in objects if o.shape == shape]
        if len(having) == 1:
            add("colour", f"what colour is the {shape}?", having[0].colour)
    for colour in COLOURS:
        having = [o for o in objects if o.colour == colour]
        if len(having) == 1:
            add("shape", f"what shape is the {colour} object?", having[0].shape)
    for obj in objects:  # colour and shape together name one object: no two objects share both
        add("size", f"what size is {_the(obj)}?", obj.size)
    add("count", "how many shapes are there?", _COUNT_WORDS[len(objects) - 1])
    for colour in COLOURS:
        for shape in SHAPES:
            present = any((o.colour, o.shape) == (colour, shape) for o in objects)
            swapped = any(o.colour == colour or o.shape == shape for o in objects)
            add("exists", f"is there a {colour} {shape}?", "yes" if present else "no", not present and swapped)
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            held = relations_between(a, b)
            for relation in RELATIONS:
                holds = relation in held
                add("relation", f"is {_the(a)} {relation} {_the(b)}?", "yes" if holds else "no",
                    not holds and INVERSE_RELATION[relation] in held)
    for i, a in enumerate(objects):
        for relation in RELATIONS:
            others = [b for j, b in enumerate(objects) if j != i and relation in relations_between(b, a)]
            answer = f"a {others[0].colour} {others[0].shape}" if others else "nothing"
            add("what_relation", f"what is {relation} {_the(a)}?", answer)
    return found


def sample_question(scene: Scene, kind: str, rng: np.random.Generator, hard_fraction: float = 0.75) -> Question | None:
    """One question of `kind` (None when the grammar defines none for the scene); yes/no kinds answer yes or no
    with equal chance, and a no is a hard negative with probability `hard_fraction` where the scene has one."""
    candidates = questions_for(scene).get(kind, [])
    if not candidates:
        return None
    if kind in YES_NO_KINDS:
        answer = "yes" if rng.random() < 0.5 else "no"
        pool = [q for q in candidates if q.answer == answer]
        if answer == "no":
            hard = [q for q in pool if q.hard]
            if hard and rng.random() < hard_fraction:
                pool = hard
        candidates = pool or candidates
    return candidates[int(rng.integers(len(candidates)))]


def question_set(scenes: Sequence[Scene], seed: int = 0, per_kind: int = 1) -> list[tuple[int, Question]]:
    """A seeded evaluation set: per scene up to `per_kind` questions of every kind, as (scene index, question).

    Yes/no kinds come out balanced (yes or no by coin flip per question, a hard no three times in four).
    """
    rng = np.random.default_rng([seed, 4721])
    picked = []
    for index, scene in enumerate(scenes):
        for kind in QUESTION_KINDS:
            for _ in range(per_kind):
                question = sample_question(scene, kind, rng)
                if question is not None:
                    picked.append((index, question))
    return picked


def normalise_answer(text: str, expected: str) -> str:
    """`text` lower-cased, punctuation stripped, a leading article dropped when `expected` has none."""
    cleaned = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    if not _ARTICLE.match(expected.lower()):
        cleaned = _ARTICLE.sub("", cleaned)
    return cleaned


def answer_is_correct(expected: str, given: str) -> bool:
    """Whether `given` equals the expected answer after normalise_answer (the grammar's rule)."""
    return normalise_answer(given, expected) == normalise_answer(expected, expected)


# ---------------------------------------------------------------- splits

class AttributeCombo(NamedTuple):
    size: str
    colour: str
    shape: str


class RelationCombo(NamedTuple):
    subject_colour: str
    subject_shape: str
    relation: str
    target_colour: str
    target_shape: str

    def converse(self) -> RelationCombo:
        """The same fact stated from the other object."""
        return RelationCombo(self.target_colour, self.target_shape, INVERSE_RELATION[self.relation],
                             self.subject_colour, self.subject_shape)


@dataclass(frozen=True)
class HeldOut:
    """Combinations that train and validation scenes never contain; only test scenes may."""

    attributes: frozenset[AttributeCombo]
    relations: frozenset[RelationCombo]  # closed under converse: one fact, stated either way, is held out

    def scene_uses(self, scene: Scene) -> bool:
        """Whether the scene contains any held-out attribute combination or relation."""
        if any(AttributeCombo(o.size, o.colour, o.shape) in self.attributes for o in scene.objects):
            return True
        objs = scene.objects
        return any(RelationCombo(objs[r.subject].colour, objs[r.subject].shape, r.name,
                                 objs[r.target].colour, objs[r.target].shape) in self.relations
                   for r in scene.relations())

    def query_uses(self, text: str) -> bool:
        """Whether a query names a held-out attribute combination or relation (so it was never trained on)."""
        c = parse_caption(text)
        phrases = [c.subject] if c.target is None else [c.subject, c.target]
        if any(p.size and AttributeCombo(p.size, p.colour, p.shape) in self.attributes for p in phrases):
            return True
        return c.relation is not None and c.target is not None and RelationCombo(
            c.subject.colour, c.subject.shape, c.relation, c.target.colour, c.target.shape) in self.relations


def held_out_combinations(seed: int = WORLD_SEED, fraction: float = _HELD_OUT_FRACTION) -> HeldOut:
    """About `fraction` of (size, colour, shape) triples and of relation facts, chosen from `seed`.

    A held-out triple's (colour, shape) stays seen at the other size.
    """
    rng = np.random.default_rng([seed, 7919])
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    # One size per chosen pair, so the pair itself is still seen.
    chosen_pairs = rng.choice(len(pairs), size=round(fraction * len(pairs) * len(SIZES)), replace=False)
    attributes = frozenset(AttributeCombo(str(rng.choice(SIZES)), *pairs[i]) for i in sorted(chosen_pairs))
    # Facts are canonical as 'left of' / 'above'; each chosen one is held out with its converse.
    facts = [RelationCombo(*a, rel, *b)
             for a in pairs for b in pairs if a != b for rel in ("left of", "above")]
    chosen_facts = rng.choice(len(facts), size=round(fraction * len(facts)), replace=False)
    relations = frozenset(x for i in chosen_facts for x in (facts[i], facts[i].converse()))
    return HeldOut(attributes, relations)


@functools.cache
def default_held_out() -> HeldOut:
    """The held-out combinations of WORLD_SEED, which the shipped models were trained without."""
    return held_out_combinations(WORLD_SEED)


def generate_scene(split: str, index: int, seed: int = 0, held_out: HeldOut | None = None) -> Scene:
    """Scene number `index` of a split; the same arguments always give the same scene.

    Train and validation scenes never use held-out combinations; test scenes come from the whole world.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    held_out = held_out or default_held_out()
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        scene = sample_scene(rng)
        if split == "test" or not held_out.scene_uses(scene):
            return scene


def generate_scenes(split: str, count: int, seed: int = 0, held_out: HeldOut | None = None,
                    start: int = 0) -> list[Scene]:
    """Scenes `start` .. `start + count - 1` of a split (see generate_scene)."""
    held_out = held_out or default_held_out()
    return [generate_scene(split, i, seed, held_out) for i in range(start, start + count)]


# ---------------------------------------------------------------- collections on disk

SCENES_FILE = "scenes.jsonl"


def write_collection(scenes: Sequence[Scene], folder: str | Path, size: int = 256, image_format: str = "png",
                     progress: Callable[[int], None] | None = None) -> Path:
    """Render scenes into `folder` as 00000.png, ... plus scenes.jsonl (file, scene, complete captions)."""
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}.get(image_format.lower())
    if ext is None:
        raise ValueError(f"image_format must be png or jpeg, not {image_format!r}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(scenes) - 1)))
    with open(out / SCENES_FILE, "w", encoding="utf-8") as lines:
        for i, scene in enumerate(scenes):
            name = f"{i:0{width}d}.{ext}"
            image = render(scene, size)
            if ext == "png":
                image.save(out / name, format="PNG")
            else:
                image.save(out / name, format="JPEG", quality=95)
            record = {"file": name, "size": size, "scene": scene.to_dict(),
                      "captions": complete_captions(scene)}
            lines.write(json.dumps(record) + "\n")
            if progress:
                progress(i + 1)
    return out / SCENES_FILE


def read_collection(folder: str | Path) -> list[tuple[Path, Scene]]:
    """The (image path, scene) pairs of a folder written by write_collection, in order."""
    root = Path(folder)
    with open(root / SCENES_FILE, encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [(root / r["file"], Scene.from_dict(r["scene"])) for r in records]
