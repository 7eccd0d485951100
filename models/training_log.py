"""The log every training script writes: each line printed and appended to `<out>/training_log.txt` at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def training_log(directory: Path) -> Iterator[Callable[[str], None]]:
    """A `log(line)` function for the block; the file is flushed per line so a killed run keeps its log."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "training_log.txt", "w", encoding="utf-8") as log_file:

        def log(line: str) -> None:
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        yield log
