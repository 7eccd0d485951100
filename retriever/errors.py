"""Errors a user can meet in the store or a query."""

from __future__ import annotations

from indexer.errors import VlsearchError


class CollectionNotFound(VlsearchError):
    """The named collection does not exist."""


class EncoderMismatch(VlsearchError):
    """A query or an upsert used an encoder other than the one that built the collection."""


class InvalidQuery(VlsearchError):
    """A query that cannot be answered as asked (no text and no image, k out of range, ...)."""


class InvalidStoreSettings(VlsearchError):
    """A store setting (index type, HNSW/IVF-PQ parameter) that cannot work with this collection."""


class CollectionCorrupt(VlsearchError):
    """A collection's files exist but cannot be read (damaged manifest)."""
