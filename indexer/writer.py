"""What the indexing pipeline needs from a store, as a protocol the stores satisfy structurally.

`indexer` sits below `retriever` in the dependency graph, so the pipeline names no store class: any object with
these methods will do (both `VectorStore`s, or a test's wrapper). Field changes go through `PayloadUpdate`
(indexer/payloads.py), so a store never receives a whole payload read earlier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from indexer.payloads import PayloadUpdate

PayloadDict = dict[str, Any]


class StoredPoint(Protocol):
    """A point as a store returns it (retriever.store.Record)."""

    @property
    def id(self) -> str: ...

    @property
    def payload(self) -> Mapping[str, Any]: ...


class ImageWriter(Protocol):
    """The store operations the pipeline uses: lookups by id and by path, upserts, merged field updates."""

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[PayloadDict], merge_existing: bool = False
    ) -> None: ...

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> Sequence[StoredPoint]: ...

    def ids_by_path(self, paths: Sequence[str]) -> Mapping[str, str]: ...

    # Any: the stores type this as Mapping[str, PayloadUpdate]; they accept PayloadUpdate structurally.
    def update_payloads(self, updates: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]: ...

    def delete(self, ids: Sequence[str], only_if_empty: Sequence[str] = ()) -> int: ...

    def save(self) -> object: ...


class BlobSink(Protocol):
    """Where the pipeline keeps the bytes of images indexed from bytes (not files), content-addressed by id."""

    def put(self, image_id: str, data: bytes) -> str:
        """Keep data under image_id (idempotent); the reference recorded in the payload's `blob` field."""
        ...


def detach_path(store: ImageWriter, image_id: str, path: str) -> bool:
    """Forget that path held this image; delete the image when neither a path nor kept bytes are left (then True)."""
    updated = store.update_payloads({image_id: PayloadUpdate(remove={"paths": (path,)})})
    payload = updated.get(image_id)
    if payload is None or payload.get("paths") or payload.get("blob"):
        return False
    # checked again as it deletes: a path another process attached meanwhile keeps the image
    return store.delete([image_id], only_if_empty=("paths", "blob")) > 0
