"""Imported into a test's worker (`vlsearch worker --include tests.workers.slow_chunks`): every index call of that
worker starts half a second late, as on a slow disk, so that a test can kill it in the middle of a chunk (its
attempt counted, its result not yet) without racing chunks that take 20 ms. Nothing else changes."""

from __future__ import annotations

import time
from typing import Any

from core.service import Service

_index = Service.index


def _slow_index(self: Service, *args: Any, **kwargs: Any) -> Any:
    time.sleep(0.5)
    return _index(self, *args, **kwargs)


Service.index = _slow_index  # type: ignore[method-assign]
