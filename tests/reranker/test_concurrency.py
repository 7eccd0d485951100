"""One generative model used from many threads at once, and one copy of its weights whatever the options."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from models import MODELS_DIR
from models.shapes_world import generate_scenes, render, true_captions
from reranker.model import VisionLanguageModel, get_model

SHAPES_VLM = str(MODELS_DIR / "shapes-vlm")
THREADS = 8
ROUNDS = 3


@pytest.fixture(scope="module")
def scene_images() -> list[Image.Image]:
    return [render(scene, 64) for scene in generate_scenes("test", 5, seed=11)]


@pytest.fixture(scope="module")
def query() -> str:
    return true_captions(generate_scenes("test", 5, seed=11)[0], ("relation", "object"))[0]


def calls(vlm: VisionLanguageModel, images: list[Image.Image], query: str) -> dict[str, Callable[[], Any]]:
    """Every public entry point that tokenises, with padding (several prompts, chunked) and without."""
    return {
        "score vqa": lambda: vlm.score(query, images, method="vqa"),
        "score caption": lambda: vlm.score(query, images, method="caption"),
        "score_texts": lambda: vlm.score_texts(images[1], [query, "a red circle", "a blue square above a circle"]),
        "caption": lambda: vlm.caption(images),
        "caption short": lambda: vlm.caption(images[:2], max_new_tokens=4),
        "ask": lambda: vlm.ask(images[2], "what is in this figure?"),
        "encode_images": lambda: vlm.encode_images(images[:2]).sum().item(),
    }


def assert_same(name: str, got: Any, expected: Any) -> None:
    if isinstance(expected, str) or (isinstance(expected, list) and isinstance(expected[0], str)):
        assert got == expected, name
    else:
        assert got == pytest.approx(expected, abs=1e-5), name


def test_eight_threads_at_once_get_the_single_thread_results(scene_images: list[Image.Image], query: str) -> None:
    """tokenizers#537: transformers sets padding on the shared Rust tokenizer before each call, so a padded call
    (generation) and an unpadded one (scoring) at once raise `RuntimeError: Already borrowed` or get each other's
    settings unless every use of the tokenizer is serialised. Two models on one copy of the weights share it."""
    own = VisionLanguageModel(SHAPES_VLM, device="cpu", chunk_size=2, max_new_tokens=12)
    first = get_model(SHAPES_VLM, device="cpu", chunk_size=3, max_new_tokens=10)
    second = get_model(SHAPES_VLM, device="cpu", chunk_size=1, max_new_tokens=10, score_method="vqa")
    assert first.model is second.model
    work = {
        (label, name): call
        for label, vlm in (("own", own), ("first", first), ("second", second))
        for name, call in calls(vlm, scene_images, query).items()
    }
    expected = {key: call() for key, call in work.items()}
    keys = list(work)
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    results: list[tuple[tuple[str, str], Any]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            for round_ in range(ROUNDS):
                offset = (index * 5 + round_) % len(keys)
                for key in keys[offset:] + keys[:offset]:
                    result = work[key]()
                    with lock:
                        results.append((key, result))
        except BaseException as error:  # reported by the main thread
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (deadlock?)"
    assert not errors, f"{len(errors)} calls failed, first: {errors[0]!r}"
    assert len(results) == THREADS * ROUNDS * len(keys)
    for key, result in results:
        assert_same(" ".join(key), result, expected[key])


def test_models_with_other_behaviour_options_share_one_copy_of_the_weights(
    scene_images: list[Image.Image], query: str
) -> None:
    vqa = get_model(SHAPES_VLM, device="cpu", chunk_size=2, score_method="vqa", image_workers=1)
    by_caption = get_model(SHAPES_VLM, device="cpu", chunk_size=5, score_method="caption", max_new_tokens=6)
    assert vqa is not by_caption
    assert vqa.model is by_caption.model and vqa.processor is by_caption.processor
    assert get_model(SHAPES_VLM, device="cpu", chunk_size=2, score_method="vqa", image_workers=1) is vqa
    built = VisionLanguageModel(SHAPES_VLM, device="cpu", chunk_size=3, shared=True)
    assert built.model is vqa.model

    # Each keeps its own behaviour on the shared weights.
    vqa_scores = vqa.score(query, scene_images)
    caption_scores = by_caption.score(query, scene_images)
    assert all(0.0 <= score <= 1.0 for score in vqa_scores)
    assert all(score <= 0.0 for score in caption_scores)
    assert vqa_scores == pytest.approx(by_caption.score(query, scene_images, method="vqa"), abs=1e-5)
    assert caption_scores == pytest.approx(vqa.score(query, scene_images, method="caption"), abs=1e-5)
    # The trained model ranks the scene its query was written from first, by its preferred (caption) method.
    assert max(range(len(scene_images)), key=caption_scores.__getitem__) == 0
    short, long = by_caption.caption(scene_images[:2]), vqa.caption(scene_images[:2])
    assert short == by_caption.caption(scene_images[:2], max_new_tokens=6)
    assert all(len(a.split()) <= len(b.split()) for a, b in zip(short, long, strict=True))


def test_other_placement_loads_other_weights() -> None:
    fp32 = get_model(SHAPES_VLM, device="cpu")
    bf16 = get_model(SHAPES_VLM, device="cpu", dtype="bf16")
    assert bf16.model is not fp32.model
    assert next(bf16.model.parameters()).dtype != next(fp32.model.parameters()).dtype


def test_a_model_built_directly_keeps_its_own_weights() -> None:
    """Unless asked to share (what get_model does), an object owns its copy: a caller may change it freely."""
    shared = get_model(SHAPES_VLM, device="cpu")
    own = VisionLanguageModel(SHAPES_VLM, device="cpu")
    assert own.model is not shared.model


def test_image_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="image_workers"):
        VisionLanguageModel(SHAPES_VLM, image_workers=0)
