"""Every error vlsearch reports to a user, from its base class up: the bottom of the dependency graph.

Each error has a `category` that says what kind of failure it is, for the API to map to one HTTP status
(invalid_input 400/422, not_found 404, conflict 409, too_large 413, unavailable 503) and for the CLI's exit.
Messages name the file or setting to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

ErrorCategory = Literal["invalid_input", "not_found", "conflict", "too_large", "unavailable"]
ERROR_CATEGORIES: tuple[ErrorCategory, ...] = ("invalid_input", "not_found", "conflict", "too_large", "unavailable")


class VlsearchError(Exception):
    """Base of every error vlsearch reports to a user (the CLI prints it on one line, the API as JSON)."""

    category: ClassVar[ErrorCategory] = "invalid_input"


class InvalidQuery(VlsearchError):
    """A request that cannot be answered as asked (no text and no image, k out of range, a malformed update...)."""


class InvalidSetting(VlsearchError):
    """A setting (environment variable or option) whose value cannot work; the message names the variable."""


class StoreUnavailable(VlsearchError):
    """A store that cannot answer now: a database locked longer than the wait allowed, a server out of reach."""

    category: ClassVar[ErrorCategory] = "unavailable"


class DecodeError(VlsearchError):
    """An image could not be decoded; carries the file (or '<bytes>') and the reason."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class UnsupportedImage(DecodeError):
    """Not an image in an allowed format (empty, text, HTML, unknown magic bytes)."""


class CorruptImage(DecodeError):
    """An allowed format whose data is truncated or broken."""


class ImageTooLarge(DecodeError):
    """Over the byte or pixel limit (decompression bombs are refused before decoding)."""

    category: ClassVar[ErrorCategory] = "too_large"


class UnreadableFile(DecodeError):
    """The file could not be read: missing, permission denied, a symbolic link loop or one leading outside the folder
    being indexed, an I/O error, a name that is not valid UTF-8, or it changed while it was read."""

    category: ClassVar[ErrorCategory] = "not_found"


class WeightsUnavailable(VlsearchError):
    """Model weights could not be found or fetched; the message names the setting to change."""

    category: ClassVar[ErrorCategory] = "unavailable"
