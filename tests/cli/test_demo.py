"""`make demo` runs `python -m cli.demo`: it must keep working end to end (small collection here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.demo import main


def test_demo_indexes_and_searches_a_shapes_collection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(root=tmp_path / "demo", scenes=40)
    out = capsys.readouterr().out
    assert "indexed 40 images" in out
    assert out.count('search "') >= 3
    assert "match" in out
