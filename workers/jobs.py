"""Job records in Redis: what a job is, where it stands, and progress that counts each chunk once.

A job is one hash (`{prefix}job:{id}`) plus three small structures beside it: the set of chunks already counted
(`:chunks`), the bounded list of per-file errors (`:errors`) and the attempts per chunk (`:attempts`). Chunks are
delivered at least once (acks_late, redelivery after a killed worker), so a chunk's result is counted by one Lua
script that adds the chunk to the set and only then adds its counts: a second delivery of the same chunk changes
nothing. The last chunk counted ends the job. Cancel is a field of the hash, read by every chunk before it works
and between its batches: revoking task ids alone would not do, since revoked ids live only in workers' memory.

Job states: queued -> running -> done | failed | cancelled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import redis

from indexer.errors import ErrorCategory, StoreUnavailable, VlsearchError

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JobKind = Literal["index", "tag", "caption"]
FINAL_STATES: tuple[JobState, ...] = ("done", "failed", "cancelled")
MAX_ERRORS = 1000  # per-file errors kept per job: the counts stay exact, the list is bounded
REDIS_SETTING = "VLSEARCH_REDIS_URL"


class JobNotFound(VlsearchError):
    """No job with that id (or it expired)."""

    category: ClassVar[ErrorCategory] = "not_found"


@dataclass(frozen=True)
class FileError:
    """One file (or URL, or image id) that failed in a job, with the error's type and reason."""

    source: str
    error: str
    reason: str


@dataclass
class JobRecord:
    """A job as the CLI, the API and the tasks see it."""

    id: str
    kind: str
    collection: str
    source: str
    options: dict[str, Any]
    state: JobState
    total: int  # images (or points) the job covers
    done: int  # images finished, failed ones included
    failed: int
    chunks: int
    chunks_done: int
    errors: list[FileError] = field(default_factory=list)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    reason: str | None = None  # why a job failed or was cancelled

    @property
    def rate(self) -> float | None:
        """Images per second since the job started (to its end, once finished)."""
        if self.started is None or not self.done:
            return None
        elapsed = (self.finished or time.time()) - self.started
        return self.done / elapsed if elapsed > 0 else None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate"] = self.rate
        return data


# KEYS: job hash, chunks set, errors list. ARGV: chunk id, done, failed, errors JSON list, max errors, now, ttl.
# Counted once per chunk: SADD first, and the counts only when the chunk is new. The last chunk ends the job.
_COUNT_CHUNK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3])
local counted = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
local errors = cjson.decode(ARGV[4])
local room = tonumber(ARGV[5]) - redis.call('LLEN', KEYS[3])
for i = 1, math.min(#errors, math.max(room, 0)) do redis.call('RPUSH', KEYS[3], errors[i]) end
if #errors > 0 then redis.call('EXPIRE', KEYS[3], ARGV[7]) end
local state = redis.call('HGET', KEYS[1], 'state')
if counted >= tonumber(redis.call('HGET', KEYS[1], 'chunks')) and (state == 'running' or state == 'queued') then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[6])
end
return 1
"""

# KEYS: job hash. ARGV: now. queued -> running, once; the start time is the first chunk's.
_START = """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1])
  return 1
end
return 0
"""

# KEYS: job hash. ARGV: final state, reason, now. Only a job not yet final ends (the first ending wins).
_END = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return -1 end
if state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'finished', ARGV[3])
return 1
"""


class JobStore:
    """Job records in one Redis database; every method is one round trip or one script, safe from any process."""

    def __init__(self, client: redis.Redis, prefix: str = "vlsearch:", ttl_seconds: int = 30 * 24 * 3600) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl_seconds
        self._count = client.register_script(_COUNT_CHUNK)
        self._start = client.register_script(_START)
        self._end = client.register_script(_END)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> JobStore:
        return cls(redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10), **options)

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}job:{job_id}{part}"

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """One Redis call; an unreachable server is a StoreUnavailable naming VLSEARCH_REDIS_URL."""
        try:
            return function(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(f"Redis is not reachable ({REDIS_SETTING}): {error}") from error

    # --- writes ------------------------------------------------------------------------------------------

    def create(
        self, kind: JobKind, collection: str, source: str, options: dict[str, Any], total: int, chunks: int
    ) -> JobRecord:
        """A new queued job of `chunks` chunks covering `total` images; done at once when there is no chunk."""
        job_id = uuid.uuid4().hex
        now = time.time()
        fields: dict[str, str | int | float] = {
            "kind": kind,
            "collection": collection,
            "source": source,
            "options": json.dumps(options),
            "state": "queued" if chunks else "done",
            "total": total,
            "done": 0,
            "failed": 0,
            "chunks": chunks,
            "chunks_done": 0,
            "created": now,
        }
        if not chunks:
            fields.update(started=now, finished=now)
        pipe = self.client.pipeline()
        pipe.hset(self._key(job_id), mapping=fields)  # type: ignore[arg-type]  # redis-py types keys invariantly
        pipe.expire(self._key(job_id), self.ttl)
        pipe.zadd(f"{self.prefix}jobs", {job_id: now})
        self._call(pipe.execute)
        return self.get(job_id)

    def start(self, job_id: str) -> bool:
        """Mark the job running (once, by its first chunk); False when it already was, or ended."""
        return bool(self._call(self._start, keys=[self._key(job_id)], args=[time.time()]))

    def count_chunk(self, job_id: str, chunk_id: str, done: int, failed: int, errors: Sequence[FileError] = ()) -> bool:
        """Add a chunk's result to the job's progress, once per chunk id whatever the deliveries; True when this
        call counted it. JobNotFound when the job is gone."""
        keys = [self._key(job_id), self._key(job_id, ":chunks"), self._key(job_id, ":errors")]
        payload = json.dumps([json.dumps(asdict(error)) for error in errors])
        arguments = [chunk_id, done, failed, payload, MAX_ERRORS, time.time(), self.ttl]
        counted = self._call(self._count, keys=keys, args=arguments)
        if counted == -1:
            raise JobNotFound(f"no job {job_id!r}")
        return counted == 1

    def attempt(self, job_id: str, chunk_id: str) -> int:
        """Count one more delivery of a chunk; how many there have been (a chunk that kills its worker every time
        is failed by the task after VLSEARCH_MAX_CHUNK_ATTEMPTS)."""
        key = self._key(job_id, ":attempts")
        attempts = int(self._call(self.client.hincrby, key, chunk_id, 1))
        self._call(self.client.expire, key, self.ttl)
        return attempts

    def cancel(self, job_id: str) -> JobRecord:
        """Ask the job to stop: chunks not started end without work, running ones stop between batches."""
        ended = self._call(self._end, keys=[self._key(job_id)], args=["cancelled", "cancelled by request", time.time()])
        if ended == -1:
            raise JobNotFound(f"no job {job_id!r}")
        return self.get(job_id)

    def fail(self, job_id: str, reason: str) -> bool:
        """End the job as failed with reason (unless it already ended)."""
        return self._call(self._end, keys=[self._key(job_id)], args=["failed", reason, time.time()]) == 1

    # --- reads -------------------------------------------------------------------------------------------

    def is_cancelled(self, job_id: str) -> bool:
        return self._call(self.client.hget, self._key(job_id), "state") in (b"cancelled", "cancelled")

    def get(self, job_id: str) -> JobRecord:
        pipe = self.client.pipeline()
        pipe.hgetall(self._key(job_id))
        pipe.lrange(self._key(job_id, ":errors"), 0, -1)
        fields, errors = self._call(pipe.execute)
        if not fields:
            raise JobNotFound(f"no job {job_id!r}")
        return _record(job_id, fields, errors)

    def list(self, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first."""
        ids = self._call(self.client.zrevrange, f"{self.prefix}jobs", 0, limit - 1)
        records = []
        for raw in ids:
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                records.append(self.get(job_id))
            except JobNotFound:
                self._call(self.client.zrem, f"{self.prefix}jobs", job_id)  # expired
        return records


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(job_id: str, raw: dict[Any, Any], errors: list[Any]) -> JobRecord:
    fields = {_text(key): _text(value) for key, value in raw.items()}

    def number(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    return JobRecord(
        id=job_id,
        kind=fields["kind"],
        collection=fields["collection"],
        source=fields["source"],
        options=json.loads(fields.get("options") or "{}"),
        state=fields["state"],  # type: ignore[arg-type]  # written by this module only
        total=int(fields["total"]),
        done=int(fields["done"]),
        failed=int(fields["failed"]),
        chunks=int(fields["chunks"]),
        chunks_done=int(fields["chunks_done"]),
        errors=[FileError(**json.loads(_text(error))) for error in errors],
        created=float(fields["created"]),
        started=number("started"),
        finished=number("finished"),
        reason=fields.get("reason") or None,
    )
