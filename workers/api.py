"""Jobs as the CLI and the HTTP API submit and follow them: split into chunks, sent to the queues, read back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.settings import Settings
from indexer.errors import InvalidQuery, StoreUnavailable
from indexer.sources import iter_sources
from retriever.tagging import load_vocabulary
from workers.app import EMBED_QUEUE, VLM_QUEUE
from workers.jobs import JobKind, JobRecord, JobStore


class Jobs:
    """Submit, get, list and cancel jobs of the collections that settings name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore.from_url(settings.redis_url)

    def submit_index(
        self,
        paths: Sequence[Path] = (),
        collection: str | None = None,
        *,
        urls: Sequence[str] = (),
        source: str | None = None,
    ) -> JobRecord:
        """An index job, in chunks of VLSEARCH_CHUNK_SIZE images: over folders (recursive) and files, or over image
        URLs, which the workers fetch through the safe fetcher (one refused or unreachable URL fails alone).
        `source` names where the list came from (a listing file) in the job record."""
        from workers.tasks import index_chunk  # the app and its tasks load only where jobs are submitted

        if bool(paths) == bool(urls):
            raise InvalidQuery("an index job takes folders and files, or image URLs: one of the two")
        if urls:
            items = list(dict.fromkeys(urls))
            return self._submit(
                "index", collection, source or f"{len(items)} URLs", items, {"urls": True}, index_chunk, EMBED_QUEUE
            )
        missing = [str(path) for path in paths if not path.exists()]
        if missing and source is None:  # named on the command line: a typo, refused at once
            raise InvalidQuery(f"no such file or folder: {', '.join(missing)}")
        files = [str(path) for path in iter_sources(paths)]  # a listing's missing files fail alone in the job
        return self._submit(
            "index", collection, source or ", ".join(map(str, paths)), files, {}, index_chunk, EMBED_QUEUE
        )

    def _submit_over_points(self, kind: JobKind, collection: str | None, options: dict[str, Any]) -> JobRecord:
        """A job over every stored image of the collection."""
        from core.service import Service
        from workers.tasks import caption_chunk, tag_chunk

        name = collection or self.settings.collection
        with Service(self.settings) as service:
            ids = service.point_ids(name)
        # Tags verified by the generative model are chosen on its queue: the chunk there reads the stored vectors too.
        on_vlm = kind == "caption" or bool(options.get("verify"))
        task, queue = (tag_chunk if kind == "tag" else caption_chunk), (VLM_QUEUE if on_vlm else EMBED_QUEUE)
        return self._submit(kind, name, name, ids, options, task, queue)

    def _submit(
        self,
        kind: JobKind,
        collection: str | None,
        source: str,
        items: list[str],
        options: dict[str, Any],
        task: Any,
        queue: str,
    ) -> JobRecord:
        """One job record, then one task per chunk of VLSEARCH_CHUNK_SIZE items; a broker that refuses the tasks
        fails the job (it could never run) and is reported naming VLSEARCH_REDIS_URL."""
        name = collection or self.settings.collection
        size = self.settings.chunk_size
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        job = self.store.create(kind, name, source, options, total=len(items), chunks=len(chunks))
        try:
            for number, chunk in enumerate(chunks):
                task.apply_async(args=[job.id, f"c{number}", name, chunk, options], queue=queue)
        except Exception as error:
            self.store.fail(job.id, f"the broker refused its tasks: {error}")
            raise StoreUnavailable(f"Redis is not reachable (VLSEARCH_REDIS_URL): {error}") from error
        return self.store.get(job.id)

    def submit_tag(
        self,
        collection: str | None = None,
        labels: Path | None = None,
        threshold: float | None = None,
        verify: bool = False,
    ) -> JobRecord:
        """A tag job: zero-shot tags from the stored vectors against a label file (default vocabulary if none);
        with verify, on the vlm queue, each image's best candidates are kept only if the generative model agrees."""
        if labels is not None:
            load_vocabulary(labels)  # a bad file is refused here, not in every chunk
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidQuery(f"tag threshold is a probability in [0, 1], got {threshold}")
        options = {"labels": str(labels.resolve()) if labels else None, "threshold": threshold, "verify": verify}
        return self._submit_over_points("tag", collection, options)

    def submit_caption(self, collection: str | None = None, force: bool = False) -> JobRecord:
        """A caption job: every image lacking a caption of the current generative model (all with force)."""
        return self._submit_over_points("caption", collection, {"force": force})

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, limit: int = 100) -> list[JobRecord]:
        return self.store.list(limit)

    def cancel(self, job_id: str) -> JobRecord:
        return self.store.cancel(job_id)
