"""How the CLI shows results to a person: tables of hits and of plain key/value data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from core.service import HitView

out = Console(highlight=False, soft_wrap=True)


def printable(text: str) -> str:
    """text on one line of a terminal: a newline, tab or other control character in a file name shown escaped
    (\\n, \\t, \\x1b), so that a name cannot split a line or move the cursor. Unicode letters stay as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def hit_rows(hits: Sequence[HitView]) -> list[dict[str, Any]]:
    """Hits as plain data for the CLI's --json (scores rounded to 6 places)."""
    return [
        {
            "id": hit.id,
            "path": hit.path,
            "paths": hit.paths,
            "score": round(hit.score, 6),
            "rerank_score": None if hit.rerank_score is None else round(hit.rerank_score, 6),
            "final_score": None if hit.final_score is None else round(hit.final_score, 6),
            "relevance": None if hit.relevance is None else round(hit.relevance, 6),
            "taken": hit.taken,
            "width": hit.width,
            "height": hit.height,
            "tags": hit.tags,
            "captions": hit.captions,
        }
        for hit in hits
    ]


def print_hits(hits: Sequence[HitView]) -> None:
    if not hits:
        out.print("no results")
        return
    reranked = any(hit.rerank_score is not None for hit in hits)
    captioned = any(hit.captions for hit in hits)
    table = Table("#", "score", *(["rerank"] if reranked else []), "path", *(["caption"] if captioned else []), "id")
    for rank, hit in enumerate(hits, 1):
        caption = next(iter(hit.captions.values()), "")
        table.add_row(
            str(rank),
            f"{hit.score:.4f}",
            *([f"{hit.rerank_score:.4f}"] if reranked and hit.rerank_score is not None else ["-"] if reranked else []),
            Text(printable(hit.path or hit.source_name or "")),  # Text: a name like "[b]x.png" is no rich markup
            *([Text(caption)] if captioned else []),
            hit.id,
        )
    out.print(table)


def print_table(data: dict[str, Any], prefix: str = "") -> None:
    """Nested key/value data, one line per leaf."""
    for key, value in data.items():
        if isinstance(value, dict):
            print_table(value, f"{prefix}{key}.")
        else:
            out.print(f"{prefix}{key}: {value}", markup=False)
