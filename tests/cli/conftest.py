"""CLI fixtures: environment for a temp data dir and the tiny model; a runner that parses --json output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import TINY_MODEL


@pytest.fixture
def cli_env(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, str]:
    return {
        "VLSEARCH_DATA_DIR": str(tmp_path / "data"),
        "VLSEARCH_CLIP_MODEL": TINY_MODEL,
        "VLSEARCH_CLIP_PRETRAINED": str(tiny_checkpoint),
        "VLSEARCH_DEVICE": "cpu",
        "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
    }


def run(env: dict[str, str], *args: str, ok: bool = True) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    if ok:
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if "--json" in args else result.stdout
    return result
