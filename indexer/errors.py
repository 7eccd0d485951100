"""Errors a user can meet while reading images or loading the encoder; every message names the file or setting."""

from __future__ import annotations

from pathlib import Path


class VlsearchError(Exception):
    """Base of every error vlsearch reports to a user (the CLI prints it on one line, the API as 4xx JSON)."""


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


class UnreadableFile(DecodeError):
    """The file could not be read: missing, permission denied, a symbolic link loop, an I/O error."""


class WeightsUnavailable(VlsearchError):
    """Model weights could not be found or fetched; the message names the setting to change."""
