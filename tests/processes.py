"""Processes the tests start: a real `vlsearch worker`, and one way to stop any process group a test started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
