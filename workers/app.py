"""The Celery app, configured from Settings: Redis broker and result backend, the `embed` and `vlm` queues.

Tasks are acknowledged late and rejected when their pool child dies, so a chunk whose worker was killed is
delivered again (to another child at once; after VLSEARCH_VISIBILITY_TIMEOUT when the whole worker was killed).
Models are never loaded here: each pool child loads its own on first use (CUDA does not survive a fork), and
runs torch on its share of the cores (cores / concurrency), so the children of one worker do not fight for them.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init

from core.container import build_settings
from core.settings import Settings

EMBED_QUEUE = "embed"  # the contrastive model: indexing, tagging (CPU or GPU)
VLM_QUEUE = "vlm"  # the generative model: captions, tag verification (GPU, one task at a time per process)
QUEUES = (EMBED_QUEUE, VLM_QUEUE)


def make_app(settings: Settings) -> Celery:
    app = Celery("vlsearch", include=["workers.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A chunk past its hard time limit goes back to the queue (its attempts bound it), never acknowledged as
        # done: its job would wait for it forever. A pool child killed as it takes a chunk is such a case: the
        # pool may not see the death until the limit (a Celery 5.7 setting).
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=1,
        # below the visibility timeout, or Redis would hand a running chunk to a second worker
        task_time_limit=0.9 * settings.visibility_timeout,
        task_soft_time_limit=0.8 * settings.visibility_timeout,
        task_default_queue=EMBED_QUEUE,
        task_routes={"workers.tasks.caption_chunk": {"queue": VLM_QUEUE}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        worker_send_task_events=True,  # Flower (celery flower) shows workers and tasks
        task_send_sent_event=True,
        task_track_started=True,
    )
    return app


app = make_app(build_settings())


_concurrency: int | None = None  # the worker's pool size, read in the parent before it forks its children


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_child(cores: int, concurrency: int | None) -> int:
    """torch threads for each pool child: the cores shared out among the children, at least one each."""
    return max(1, cores // max(1, concurrency or cores))


@celeryd_after_setup.connect
def _remember_concurrency(sender: Any, instance: Any, **_: Any) -> None:
    global _concurrency
    _concurrency = int(instance.concurrency)


@worker_process_init.connect
def _share_out_cores(**_: Any) -> None:
    import torch  # imported in the child only; the parent never runs torch (see reranker.model's fork hook)

    torch.set_num_threads(threads_per_child(available_cores(), _concurrency))
