"""The table each stage's job prints at the end (the summary dict is what tests read)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def by_reason(counts: Mapping[str, int]) -> str:
    """``{"http_404": 2, "corrupt": 1}`` → ``" (corrupt: 1, http_404: 2)"``; empty if none."""
    return f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else ""


def table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """Aligned ``name  value`` lines under a title; rows whose value is None are left out."""
    rows = [(k, v) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])
