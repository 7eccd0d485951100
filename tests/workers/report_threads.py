"""Imported into a test's worker (`--include tests.workers.report_threads`): each pool child writes, once it is set
up, how many threads torch runs on into the folder VLSEARCH_TEST_THREADS_DIR names (one file per child)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init


@worker_process_init.connect
def _report(**_: Any) -> None:
    import torch

    folder = Path(os.environ["VLSEARCH_TEST_THREADS_DIR"])
    (folder / str(os.getpid())).write_text(str(torch.get_num_threads()))
