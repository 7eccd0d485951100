"""Candidate images prepared together: input order kept, and usable in a forked worker."""

from __future__ import annotations

import os

from PIL import Image

from reranker.images import prepare, prepare_all


def test_prepare_all_keeps_input_order_and_equals_prepare() -> None:
    images = [Image.new("RGB", (400 + 40 * i, 300), (10 * i, 0, 0)) for i in range(6)]
    prepared = prepare_all(images, 32)
    expected = [prepare(image, 32) for image in images]
    assert [p.size for p in prepared] == [e.size for e in expected]
    assert [p.tobytes() for p in prepared] == [e.tobytes() for e in expected]


def test_a_forked_child_prepares_images_after_the_parent_used_the_pool() -> None:
    """A prefork Celery worker is forked from a parent whose threads it does not inherit."""
    images = [Image.new("RGB", (300, 200)) for _ in range(4)]
    assert len(prepare_all(images, 32)) == 4
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its own pool prepared the images
        try:
            os._exit(0 if len(prepare_all(images, 32)) == 4 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
