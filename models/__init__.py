"""Tiny checkpoints and configs shipped for tests and the offline demo, with the scripts that made them."""
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
