"""Errors a user can meet in the store or a query."""

from __future__ import annotations

from typing import ClassVar

from indexer.errors import ErrorCategory, InvalidQuery, StoreUnavailable, VlsearchError

__all__ = [
    "CollectionClosed",
    "CollectionCorrupt",
    "CollectionExists",
    "CollectionNotFound",
    "EncoderMismatch",
    "InvalidQuery",
    "InvalidStoreSettings",
    "PointNotFound",
    "SaveFailed",
    "StorageFull",
    "StoreBusy",
    "StoreUnavailable",
]


class CollectionNotFound(VlsearchError):
    """The named collection does not exist."""

    category: ClassVar[ErrorCategory] = "not_found"


class CollectionExists(VlsearchError):
    """A collection of that name exists where a new one was asked for."""

    category: ClassVar[ErrorCategory] = "conflict"


class PointNotFound(VlsearchError):
    """No image with that id in the collection."""

    category: ClassVar[ErrorCategory] = "not_found"


class EncoderMismatch(VlsearchError):
    """A query or an upsert used an encoder other than the one that built the collection."""

    category: ClassVar[ErrorCategory] = "conflict"


class InvalidStoreSettings(VlsearchError):
    """A store setting (index type, HNSW/IVF-PQ parameter) that cannot work with this collection."""


class CollectionCorrupt(VlsearchError):
    """A collection's files exist but cannot be read (damaged manifest)."""

    category: ClassVar[ErrorCategory] = "unavailable"


class CollectionClosed(VlsearchError):
    """The store object was closed (a shutdown, or a fork: the child reopens its own)."""

    category: ClassVar[ErrorCategory] = "unavailable"


class StoreBusy(StoreUnavailable):
    """The collection's database stayed locked by another writer longer than VLSEARCH_LOCK_TIMEOUT."""


class SaveFailed(StoreUnavailable):
    """The index or database could not be written to disk (disk full, permissions); nothing committed is lost."""


class StorageFull(SaveFailed):
    """The disk holding a collection (or the data dir) is full: the write that met it was not made, and what was
    stored before it is kept."""
