"""Imported into a test's worker (`vlsearch worker --include tests.workers.poison_chunks`): indexing a file whose
name starts with `poison` kills the pool child outright (SIGKILL, as an out-of-memory kill or a native crash in a
decoder would), every time. Nothing else changes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from core.service import Service

_index = Service.index


def _index_or_die(self: Service, paths: Any, *args: Any, **kwargs: Any) -> Any:
    if any(Path(path).name.startswith("poison") for path in paths):
        os.kill(os.getpid(), signal.SIGKILL)
    return _index(self, paths, *args, **kwargs)


Service.index = _index_or_die  # type: ignore[method-assign]
