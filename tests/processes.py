"""Processes the tests start: a real `vlsearch worker`, one way to stop any process group a test started, and the
Redis database a test module has to itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
VLSEARCH = str(Path(sys.executable).parent / "vlsearch")  # the installed console script


def start_worker(
    env: dict[str, str],
    log: Path,
    *,
    queues: str = "embed",
    concurrency: int = 1,
    include: Sequence[str] = (),
    loglevel: str = "info",
) -> subprocess.Popen[bytes]:
    """`vlsearch worker` in a process group of its own (its pool children with it), appending to log (the workers
    of one test may share it); include: test modules its pool imports (e.g. tests.workers.slow_chunks)."""
    command = [VLSEARCH, "worker", "--queues", queues, "--concurrency", str(concurrency), "--loglevel", loglevel]
    if include:
        command.append(f"--include={','.join(include)}")
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the process's group (a warm shutdown), SIGKILL if it is still there after timeout; reaped."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def empty_redis_db(url: str) -> Iterator[redis.Redis]:
    """The machine's Redis database at url (a test module's own number), emptied before and after; the test fails
    naming url when Redis cannot be reached."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError:
        pytest.fail(f"these tests need Redis at {url}")
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
