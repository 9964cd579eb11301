"""The Parquet contracts between stages (the data flow is in README.md).

Each stage writes under ``storage.root``:

- ``index/<batch>.parquet``: one row per video to scrape.
- ``chunks/<video_id>.parquet``: every chunk of one video in one atomically written file, so
  a video is either fully scraped or absent (never partial).
- ``tokens/<batch>.parquet``: codec codes and timed text ids per chunk, with the words they
  were made from, where those came from (``text_source``) and the chunk's language;
  ``tokens/_codec.json`` records the codec that made them (runs before the rename wrote
  ``tokens/codec.json``).
- ``failures/<stage>/<item_id>.parquet``: one row per failed item with its attempt count.

Every one of these folders opens as a Parquet dataset (pyarrow, Ray Data, DuckDB, pandas):
a file in it that is not Parquet must start with ``_`` (or ``.``, like the ``.tmp-`` files of
an atomic write), the prefixes those readers skip.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS_DIR = "tokens"
CODEC_RECORD = f"{TOKENS_DIR}/_codec.json"
"""The codec record of ``tokens/`` (:class:`voxtral.codec.CodecInfo` as a dict)."""
LEGACY_CODEC_RECORD = f"{TOKENS_DIR}/codec.json"
"""The record's name before it took the ``_`` prefix that dataset readers skip."""

INDEX = pa.schema(
    [
        ("video_id", pa.string()),
        ("url", pa.string()),
        ("title", pa.string()),
        ("channel", pa.string()),
        ("duration_s", pa.float64()),
        ("search_term", pa.string()),
        ("source", pa.string()),  # "youtube" | "local"
    ]
)

CAPTION_WORD = pa.struct(
    [
        ("word", pa.string()),
        ("start_s", pa.float32()),
        ("end_s", pa.float32()),
        ("speaker", pa.string()),  # the turn the word falls in (null: none, or no diarisation)
    ]
)

SPEAKER_TURN = pa.struct(
    [
        ("start_s", pa.float32()),  # chunk-relative, clipped to the chunk
        ("end_s", pa.float32()),
        ("speaker", pa.string()),  # "S0", "S1"… in order of first appearance in the video
        ("overlap", pa.bool_()),  # another speaker talks during (part of) this turn
    ]
)
"""Who speaks when inside a chunk (:mod:`voxtral.diarize`). Speaker ids are per video:
``S1`` is the same voice in every chunk of a video and means nothing across videos."""

DIARIZATION = ("channels", "embeddings", "pyannote", "none", "off", "failed")
"""Values of the chunks' ``diarization`` column: how the turns were found (``channels``:
a two-track stereo source split by channel, exact; ``embeddings``: voice embeddings and
clustering; ``pyannote``: pyannote.audio), ``none`` (no speech long enough to diarise),
``off`` (``diarize.enabled`` false) or ``failed`` (the diarisation raised: the chunks are
kept, with empty turns, and the scrape summary counts the video; see
``voxtral.stages.scrape``)."""

CHUNKS = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("video_id", pa.string()),
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("audio", pa.binary()),  # FLAC bytes: mono, or 2 channels (see ``channels``)
        ("speech_ratio", pa.float32()),
        ("captions", pa.list_(CAPTION_WORD)),  # times relative to the chunk start
        ("channels", pa.int8()),  # 2 only for a source split by channel: one speaker each
        ("turns", pa.list_(SPEAKER_TURN)),  # sorted by start; overlapping turns overlap
        ("diarization", pa.string()),  # one of DIARIZATION
    ]
)
"""One row per chunk. Readers that want mono (the codec, the tokenizer) down-mix a
two-channel chunk by averaging (:func:`voxtral.audio.flac_decode`)."""

WORD = CAPTION_WORD
"""A word of a token row: a caption word or a Whisper word, one structure for both."""

TEXT_SOURCES = ("captions", "asr", "none")
"""``text_source`` of a token row: caption words; Whisper's words (``asr``, see
:mod:`voxtral.asr`); ``none``, no words at all (no captions and ``text.source=captions``,
or Whisper heard no words: then ``language`` is still set)."""

TOKENS = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("video_id", pa.string()),
        ("codec", pa.string()),
        ("n_q", pa.int32()),
        ("frames", pa.int32()),
        ("codes", pa.binary()),  # int16 little-endian, shape (n_q, frames), C order
        ("text_ids", pa.list_(pa.int32())),
        ("text_starts_s", pa.list_(pa.float32())),  # start time of each text id, chunk-relative
        # The words text_ids were made from, time-ordered, times inside the chunk.
        ("words", pa.list_(WORD)),
        ("text_source", pa.string()),  # one of TEXT_SOURCES
        ("language", pa.string()),  # Whisper's language code ("en") where ASR ran, else null
        # Two-stream (full-duplex) rows, ``tokenizer.streams: 2``: one row per main speaker of
        # a diarised chunk, that speaker as "the model". ``codes`` is then the model's track,
        # ``user_codes`` everyone else's (same codec, n_q and frames), and ``words`` only the
        # model speaker's. Both null in single-stream rows.
        ("model_speaker", pa.string()),
        ("user_codes", pa.binary()),  # as ``codes``
    ]
)


def token_file_streams(meta: pq.FileMetaData) -> set[int]:
    """The stream counts of a token file's rows, from its footer alone (the ``user_codes``
    column's null counts): {1}, {2}, both, or empty for a file without rows. A row group
    without statistics counts as both, so a check on it can only refuse, never pass
    wrongly."""
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if meta.num_rows == 0:
        return set()
    if "user_codes" not in leaves:
        return {1}
    col = leaves.index("user_codes")  # a leaf index: list columns have their own leaves
    out: set[int] = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(col).statistics
        if group.num_rows == 0:
            continue
        if stats is None or not stats.has_null_count:
            return {1, 2}
        if stats.null_count:
            out.add(1)
        if stats.null_count < group.num_rows:
            out.add(2)
    return out


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """``[n_q, frames]`` codes → the ``codes`` column: int16 little-endian, C order."""
    return np.ascontiguousarray(codes, dtype="<i2").tobytes()


def codes_from_bytes(data: bytes, n_q: int, frames: int) -> np.ndarray:
    """The ``codes`` column → ``[n_q, frames]`` int16 (a read-only view of ``data``)."""
    arr = np.frombuffer(data, dtype="<i2")
    if arr.size != n_q * frames:
        raise ValueError(f"codes hold {arr.size} values, expected n_q×frames={n_q}×{frames}")
    return arr.reshape(n_q, frames)


FAILURES = pa.schema(
    [
        ("item_id", pa.string()),  # video_id (index, scrape) or chunk_id (preprocess)
        ("video_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # short machine-readable class, e.g. "http_404", "no_speech"
        ("error", pa.string()),  # the human-readable message
        ("attempts", pa.int32()),
    ]
)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(item_id: str) -> str:
    """A file name derived from an id (never from a title): only ``[A-Za-z0-9_.-]``."""
    name = _SAFE.sub("_", item_id).lstrip(".")
    if not name:
        raise ValueError(f"id {item_id!r} gives an empty file name")
    return name[:200]
