"""Jobs as the CLI and the HTTP API submit and follow them: split into chunks, sent to the queues, read back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.settings import Settings
from indexer.errors import InvalidQuery, StoreUnavailable
from indexer.sources import iter_sources
from workers.jobs import JobRecord, JobStore


class Jobs:
    """Submit, get, list and cancel jobs of the collections that settings name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore.from_url(settings.redis_url)

    def submit_index(self, paths: Sequence[Path], collection: str | None = None) -> JobRecord:
        """An index job over folders (recursive) and files, in chunks of VLSEARCH_CHUNK_SIZE files."""
        missing = [str(path) for path in paths if not path.exists()]
        if missing:
            raise InvalidQuery(f"no such file or folder: {', '.join(missing)}")
        files = [str(path) for path in iter_sources(paths)]
        name = collection or self.settings.collection
        size = self.settings.chunk_size
        chunks = [files[start : start + size] for start in range(0, len(files), size)]
        source = ", ".join(str(path) for path in paths)
        job = self.store.create("index", name, source, {}, total=len(files), chunks=len(chunks))
        from workers.tasks import index_chunk  # the app and its tasks load only where jobs are submitted

        try:
            for number, chunk in enumerate(chunks):
                index_chunk.apply_async(args=[job.id, f"c{number}", name, chunk], queue="embed")
        except Exception as error:  # the broker refused: the job cannot run
            self.store.fail(job.id, f"the broker refused its tasks: {error}")
            raise StoreUnavailable(f"Redis is not reachable (VLSEARCH_REDIS_URL): {error}") from error
        return self.store.get(job.id)

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, limit: int = 100) -> list[JobRecord]:
        return self.store.list(limit)

    def cancel(self, job_id: str) -> JobRecord:
        return self.store.cancel(job_id)
