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


INTERRUPTED = "interrupted"
"""Reason of an attempt that never ended: its process was killed (out of memory) or lost."""


def record_failure(
    storage: Storage,
    stage: str,
    item_id: str,
    video_id: str,
    reason: str,
    error: str,
    new_attempt: bool = True,
) -> dict:
    """Write the failure row of one item and return it. ``new_attempt`` counts one more
    attempt; False gives the reason of the attempt that :func:`begin_attempt` counted."""
    old = read_failure(storage, stage, item_id)
    previous = old["attempts"] if old else 0
    row = {
        "item_id": item_id,
        "video_id": video_id,
        "stage": stage,
        "reason": reason,
        "error": error[:2000],
        "attempts": previous + 1 if new_attempt else max(previous, 1),
    }
    storage.write_table(_rel(stage, item_id), pa.Table.from_pylist([row], schema=schema.FAILURES))
    return row


def begin_attempt(storage: Storage, stage: str, item_id: str, video_id: str) -> dict:
    """Count an attempt before its work starts, as an ``interrupted`` failure that the end
    of the attempt replaces (a reason, or nothing on success). A process killed on the way
    (out of memory) writes nothing more, so without this every rerun would try the same
    item again, forever."""
    return record_failure(
        storage,
        stage,
        item_id,
        video_id,
        INTERRUPTED,
        "the attempt did not finish: its process was killed (out of memory?) or lost",
    )


def clear_failure(storage: Storage, stage: str, item_id: str) -> None:
    storage.delete(_rel(stage, item_id))


def read_failure(storage: Storage, stage: str, item_id: str) -> dict | None:
    """The failure row of one item, if it has one."""
    rel = _rel(stage, item_id)
    table = storage.read_table(rel) if storage.exists(rel) else None
    return table.to_pylist()[0] if table is not None and len(table) else None


def read_failures(storage: Storage, stage: str) -> list[dict]:
    table = storage.read_table(f"failures/{stage}")
    return [] if table is None else table.to_pylist()


def given_up(
    rows: list[dict], max_attempts: int, permanent: frozenset[str] = frozenset()
) -> set[str]:
    """The items of these failure rows that a rerun leaves alone: out of attempts, or failed
    for a ``permanent`` reason (retrying changes nothing, e.g. undecodable bytes)."""
    return {r["item_id"] for r in rows if r["attempts"] >= max_attempts or r["reason"] in permanent}
