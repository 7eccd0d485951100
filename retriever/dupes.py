"""Near-duplicate groups: images whose vectors are at least `threshold` similar, joined transitively."""

from __future__ import annotations

from retriever.store import Record, VectorStore


def near_duplicate_groups(store: VectorStore, threshold: float = 0.95, max_neighbours: int = 32) -> list[list[Record]]:
    """Groups of two or more images (largest first); an image stored under several paths is a group of its own too."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]  # path halving keeps the trees flat
            node = parent[node]
        return node

    records: dict[str, Record] = {}
    for record in store.scroll(with_vectors=True):
        records[record.id] = record
        assert record.vector is not None
        for hit in store.search(record.vector, max_neighbours, min_score=threshold):
            if hit.id != record.id:
                parent[find(hit.id)] = find(record.id)

    members: dict[str, list[Record]] = {}
    for image_id, record in records.items():
        members.setdefault(find(image_id), []).append(record)
    groups = [
        sorted(group, key=lambda r: r.id)
        for group in members.values()
        if len(group) > 1 or len(group[0].payload.get("paths", [])) > 1
    ]
    return sorted(groups, key=lambda group: (-len(group), group[0].id))
