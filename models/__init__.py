"""Tiny checkpoints and configs shipped for tests and the offline demo, with the scripts that made them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

MODELS_DIR = Path(__file__).resolve().parent
SHIPPED_FILE = MODELS_DIR / "shipped.json"  # shipped model name -> {"kind": "clip" | "vlm", "directory": ...}
ModelKind = Literal["clip", "vlm"]


def shipped_models(kind: ModelKind, manifest: Path = SHIPPED_FILE) -> dict[str, Path]:
    """The shipped models of one kind, by name: their directories (relative ones are under models/)."""
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    return {
        name: (manifest.parent / entry["directory"]).resolve()
        for name, entry in entries.items()
        if entry["kind"] == kind
    }
