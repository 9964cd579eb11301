"""The token check: training refuses tokens made with another codec or layout than the
model's.

One place for the checks: the codec record ``tokens/_codec.json`` through
:func:`voxtral.codec.check_codec_compatible` (against the codec config, which also pins the
weights: random-init and pretrained codes are unrelated, and against the layout), and every
row's ``codec`` and ``n_q`` against the model's layout (a folder could mix runs), and under a
2-stream layout every row's ``user_codes`` (single-stream tokens have none).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from voxtral.codec import CodecInfo, check_codec_compatible, codec_info
from voxtral.config import CodecConfig
from voxtral.layout import Layout
from voxtral.schema import TOKENS_DIR, token_file_streams
from voxtral.storage import Storage


class TokenMismatchError(ValueError):
    """Token rows made with another codec or layout than the model's."""


def check_row_codec(codec: str, n_q: int, layout: Layout, where: str) -> None:
    if codec != layout.codec or n_q != layout.vocab.n_q:
        raise TokenMismatchError(
            f"tokens {where} were made with codec {codec!r} n_q={n_q}, but the model's layout "
            f"is {layout.codec!r} n_q={layout.vocab.n_q}; re-run preprocess with this codec "
            "config, or set codec.* to what made the tokens"
        )


def check_row_streams(has_user_codes: bool, layout: Layout, where: str) -> None:
    """A 2-stream layout needs the user's track in every row; single-stream rows lack it."""
    if layout.streams == 2 and not has_user_codes:
        raise TokenMismatchError(
            f"tokens {where} have no user_codes (single-stream tokens), but the model's layout "
            "has 2 streams; preprocess with tokenizer.streams=2 into a new storage.root (a "
            "root's chunks are encoded once), or set tokenizer.streams=1"
        )


def check_tokens(storage: Storage, codec: CodecConfig, layout: Layout) -> pa.Table:
    """Check ``tokens/`` against the codec config and layout; returns its ``chunk_id,
    video_id, frames`` columns. Reads only small columns: cheap, before any worker starts."""
    if not storage.parquet_files(TOKENS_DIR):
        raise FileNotFoundError(f"no tokens under {storage.uri(TOKENS_DIR)}: run preprocess first")
    check_codec_compatible(storage, codec_info(codec))
    check_codec_compatible(storage, CodecInfo.from_layout(layout))
    table = storage.read_table(
        TOKENS_DIR, columns=["chunk_id", "video_id", "codec", "n_q", "frames"]
    )
    pairs = table.group_by(["codec", "n_q"]).aggregate([("chunk_id", "min")])
    for row in pairs.to_pylist():
        check_row_codec(row["codec"], int(row["n_q"]), layout, f"(e.g. {row['chunk_id_min']})")
    if layout.streams == 2:
        for path in storage.parquet_files(TOKENS_DIR):
            meta = pq.ParquetFile(path, filesystem=storage.fs).metadata
            check_row_streams(1 not in token_file_streams(meta), layout, f"in {path}")
    return table.select(["chunk_id", "video_id", "frames"])
