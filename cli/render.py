"""How the CLI shows results to a person: tables of hits and of plain key/value data."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from retriever.store import Hit

out = Console(highlight=False, soft_wrap=True)


def hit_rows(hits: list[Hit]) -> list[dict[str, Any]]:
    """Hits as plain data, the same shape for the CLI's --json and the API."""
    return [
        {
            "id": hit.id,
            "path": hit.path,
            "paths": hit.payload.get("paths", []),
            "score": round(hit.score, 6),
            "rerank_score": None if hit.rerank_score is None else round(hit.rerank_score, 6),
            "final_score": None if hit.final_score is None else round(hit.final_score, 6),
            "width": hit.payload.get("width"),
            "height": hit.payload.get("height"),
            "tags": hit.payload.get("tags", []),
            "captions": hit.payload.get("captions", {}),
        }
        for hit in hits
    ]


def print_hits(hits: list[Hit]) -> None:
    if not hits:
        out.print("no results")
        return
    reranked = any(hit.rerank_score is not None for hit in hits)
    captioned = any(hit.payload.get("captions") for hit in hits)
    table = Table("#", "score", *(["rerank"] if reranked else []), "path", *(["caption"] if captioned else []), "id")
    for rank, hit in enumerate(hits, 1):
        caption = next(iter((hit.payload.get("captions") or {}).values()), "")
        table.add_row(
            str(rank),
            f"{hit.score:.4f}",
            *([f"{hit.rerank_score:.4f}"] if reranked and hit.rerank_score is not None else ["-"] if reranked else []),
            hit.path or "",
            *([caption] if captioned else []),
            hit.id,
        )
    out.print(table)


def print_table(data: dict[str, Any], prefix: str = "") -> None:
    """Nested key/value data, one line per leaf."""
    for key, value in data.items():
        if isinstance(value, dict):
            print_table(value, f"{prefix}{key}.")
        else:
            out.print(f"{prefix}{key}: {value}")
