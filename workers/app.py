"""The Celery app, configured from Settings: Redis broker and result backend, the `embed` and `vlm` queues.

Tasks are acknowledged late and rejected when their pool child dies, so a chunk whose worker was killed is
delivered again (to another child at once; after VLSEARCH_VISIBILITY_TIMEOUT when the whole worker was killed).
Models are never loaded here: each pool child loads its own on first use (CUDA does not survive a fork).
"""

from __future__ import annotations

from celery import Celery

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
