"""What an app sets up for its process at start-up (the lifespan)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("setting", "expected"), [(1, 1), (3, 3), (0, 2)])
def test_the_api_process_sets_its_torch_threads(
    tmp_path: Path, torch_threads: None, setting: int, expected: int
) -> None:
    torch.set_num_threads(2)  # as torch would on two cores; 0 leaves it so
    app = create_app(Settings(data_dir=tmp_path / "data", api_preload=False, api_torch_threads=setting))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        # torch's count is per thread once a thread has used it; the requests' pool threads start after the lifespan
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(torch.get_num_threads).result() == expected
