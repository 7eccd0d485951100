"""Jobs as the CLI and the HTTP API submit and follow them: split into chunks, sent to the queues, read back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.settings import Settings
from indexer.errors import InvalidQuery, StoreUnavailable, UnreadableFile
from indexer.sources import RefusedFile, iter_sources, path_text
from retriever.tagging import load_vocabulary
from workers.app import EMBED_QUEUE, VLM_QUEUE
from workers.jobs import FileError, JobKind, JobRecord, JobStore


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name longer than the file system takes (ENAMETOOLONG), say: no such file either
        return False


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
        missing = [str(path) for path in paths if not _exists(path)]
        if missing and source is None:  # named on the command line: a typo, refused at once
            raise InvalidQuery(f"no such file or folder: {', '.join(missing)}")
        found = list(iter_sources(paths))  # a listing's missing files fail alone in the job
        files = [str(path) for path in found if not isinstance(path, RefusedFile)]
        refused = [
            FileError(path_text(f.path), UnreadableFile.__name__, f.reason) for f in found if isinstance(f, RefusedFile)
        ]
        return self._submit(
            "index", collection, source or ", ".join(map(str, paths)), files, {}, index_chunk, EMBED_QUEUE, refused
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
        refused: Sequence[FileError] = (),
    ) -> JobRecord:
        """One job record, then one task per chunk of VLSEARCH_CHUNK_SIZE items; a broker that refuses the tasks
        fails the job (it could never run) and is reported naming VLSEARCH_REDIS_URL. Items `refused` before the
        job (a folder's link leading out of it) are counted failed at once, as a chunk of their own."""
        name = collection or self.settings.collection
        size = self.settings.chunk_size
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        total, parts = len(items) + len(refused), len(chunks) + bool(refused)
        job = self.store.create(kind, name, source, options, total=total, chunks=parts)
        if refused:
            self.store.count_chunk(job.id, "refused", done=len(refused), failed=len(refused), errors=refused)
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
