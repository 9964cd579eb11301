"""Failure records: one Parquet row per failed item, with the number of attempts so far.

A failure is data, not a crash: the stage goes on, the row says why, and a rerun retries
the item until ``attempts`` reaches the stage's limit. A success deletes the record.
"""

from __future__ import annotations

import pyarrow as pa

from voxtral import schema
from voxtral.storage import Storage


def _rel(stage: str, item_id: str) -> str:
    return f"failures/{stage}/{schema.safe_name(item_id)}.parquet"


def record_failure(
    storage: Storage, stage: str, item_id: str, video_id: str, reason: str, error: str
) -> dict:
    """Write (or bump) the failure row of one item and return it."""
    rel = _rel(stage, item_id)
    old = storage.read_table(rel) if storage.exists(rel) else None
    previous = old.column("attempts")[0].as_py() if old is not None and len(old) else 0
    row = {
        "item_id": item_id,
        "video_id": video_id,
        "stage": stage,
        "reason": reason,
        "error": error[:2000],
        "attempts": previous + 1,
    }
    storage.write_table(rel, pa.Table.from_pylist([row], schema=schema.FAILURES))
    return row


def clear_failure(storage: Storage, stage: str, item_id: str) -> None:
    storage.delete(_rel(stage, item_id))


def read_failures(storage: Storage, stage: str) -> list[dict]:
    table = storage.read_table(f"failures/{stage}")
    return [] if table is None else table.to_pylist()


def attempts(storage: Storage, stage: str) -> dict[str, int]:
    """item_id → attempts so far, for every item that failed in ``stage``."""
    return {r["item_id"]: r["attempts"] for r in read_failures(storage, stage)}
