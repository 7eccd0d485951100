"""A model loaded before a fork is never shared with the child: the child loads its own, the parent keeps its.

What a prefork Celery pool does to a worker that has already used the model (CUDA does not survive a fork).
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from models import MODELS_DIR
from models.shapes_world import generate_scenes, render, true_captions
from reranker.model import VisionLanguageModel, get_model

SHAPES_VLM = str(MODELS_DIR / "shapes-vlm")
CHILD_TIMEOUT = 120.0


def in_forked_child(work: Callable[[], dict[str, Any]], timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Run `work` in a forked child and return what it returned (or raise with the child's error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 0
        try:
            os.close(read_end)
            payload: dict[str, Any]
            try:
                payload = {"result": work()}
            except BaseException as error:
                payload = {"error": repr(error)}
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(write_end, data) :]
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the forked child did not finish in {timeout:.0f} s (deadlock?)")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    payload = json.loads(b"".join(chunks))
    assert "error" not in payload, f"in the child: {payload.get('error')}"
    return dict(payload["result"])


@pytest.fixture(scope="module")
def scene_images() -> list[Image.Image]:
    return [render(scene, 64) for scene in generate_scenes("test", 4, seed=21)]


@pytest.fixture(scope="module")
def query() -> str:
    return true_captions(generate_scenes("test", 4, seed=21)[0], ("relation", "object"))[0]


def test_a_forked_child_reloads_the_model_and_the_parent_keeps_its_own(
    scene_images: list[Image.Image], query: str
) -> None:
    own = VisionLanguageModel(SHAPES_VLM, device="cpu", chunk_size=3, max_new_tokens=10)
    shared = get_model(SHAPES_VLM, device="cpu", chunk_size=2)
    parent_scores, parent_captions = own.score(query, scene_images), own.caption(scene_images)
    parent_shared_scores = shared.score(query, scene_images)
    own_before, shared_before = own.model, shared.model
    ids_before = {id(own_before), id(shared_before)}

    def child() -> dict[str, Any]:
        scores, captions = own.score(query, scene_images), own.caption(scene_images)
        again = get_model(SHAPES_VLM, device="cpu", chunk_size=2)
        return {
            "own reloaded": own.model is not own_before and id(own.model) not in ids_before,
            "shared reloaded": shared.model is not shared_before and id(shared.model) not in ids_before,
            "get_model builds anew": again is not shared,
            "one copy in the child": again.model is shared.model,
            "scores": scores,
            "captions": captions,
            "shared scores": shared.score(query, scene_images),
        }

    result = in_forked_child(child)
    assert result["own reloaded"] and result["shared reloaded"]
    assert result["get_model builds anew"] and result["one copy in the child"]
    assert result["scores"] == pytest.approx(parent_scores, abs=1e-5)
    assert result["captions"] == parent_captions
    assert result["shared scores"] == pytest.approx(parent_shared_scores, abs=1e-5)

    # The parent's objects are untouched by the child and still work after it exited.
    assert own.model is own_before and shared.model is shared_before
    assert get_model(SHAPES_VLM, device="cpu", chunk_size=2) is shared
    assert own.score(query, scene_images) == pytest.approx(parent_scores, abs=1e-5)
    assert own.caption(scene_images) == parent_captions


def test_a_fork_while_another_thread_runs_the_model_gives_a_working_child(
    scene_images: list[Image.Image], query: str
) -> None:
    """The thread that held the model's locks at the fork does not exist in the child: its locks are not kept."""
    vlm = VisionLanguageModel(SHAPES_VLM, device="cpu", chunk_size=2, max_new_tokens=8)
    expected_scores, expected_captions = vlm.score(query, scene_images), vlm.caption(scene_images[:2])
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            while not stop.is_set():
                vlm.caption(scene_images[:2])
                vlm.score(query, scene_images)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        work = lambda: {"scores": vlm.score(query, scene_images), "captions": vlm.caption(scene_images[:2])}  # noqa: E731
        results = [in_forked_child(work) for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[0]
    for result in results:
        assert result["scores"] == pytest.approx(expected_scores, abs=1e-5)
        assert result["captions"] == expected_captions
