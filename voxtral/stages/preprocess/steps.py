"""The per-batch steps of the preprocess plan (see the package docstring): decode tasks,
codec actors and writers, and the Arrow schemas between them."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from voxtral import failures, schema
from voxtral.audio import AudioError
from voxtral.codec import load_codec
from voxtral.codec.batching import (
    autocast_keeps_codes,
    decode_pcm,
    encode_group,
    pad_batch,
    plan_batches,
)
from voxtral.config import CodecConfig, ModelConfig, PreprocessConfig
from voxtral.metrics import Metric, Metrics
from voxtral.model import load_text_tokenizer, resolve_base
from voxtral.schema import TOKENS_DIR, codes_to_bytes
from voxtral.storage import Storage
from voxtral.tokenizer import timed_text_ids
from voxtral.words import choose_words

log = logging.getLogger(__name__)

STAGE = "preprocess"
PERMANENT_REASONS = frozenset({"corrupt_flac", "bad_audio"})
"""Failures a rerun does not retry: the chunk's bytes are what they are."""

# Decode tasks → codec actors: one row per codec batch. ``pcm`` is ``[n, width]`` in C order
# of ``dtype`` (``<i2``: value / 32768 is the sample; ``<f4``), width = the longest chunk's
# whole frames; a row of chunks that failed to decode has width 0 and no pcm.
BATCHES = pa.schema(
    [
        ("chunk_id", pa.list_(pa.string())),
        ("video_id", pa.list_(pa.string())),
        ("samples", pa.list_(pa.int64())),
        ("captions", pa.list_(pa.list_(schema.CAPTION_WORD))),
        ("turns", pa.list_(pa.list_(schema.SPEAKER_TURN))),  # diarisation's, per chunk
        ("reason", pa.list_(pa.string())),  # null while the chunk is fine
        ("error", pa.list_(pa.string())),
        ("pcm", pa.large_binary()),
        ("dtype", pa.string()),
        ("width", pa.int64()),
    ]
)

# Codec actors → writers: one row per chunk, its codes and its outcome.
ENCODED = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("video_id", pa.string()),
        ("codec", pa.string()),
        ("n_q", pa.int32()),
        ("frames", pa.int32()),
        ("codes", pa.binary()),
        ("captions", pa.list_(schema.CAPTION_WORD)),
        ("turns", pa.list_(schema.SPEAKER_TURN)),
        ("asr_words", pa.list_(schema.WORD)),  # null: Whisper did not run on this chunk
        ("language", pa.string()),
        ("seconds", pa.float64()),
        ("encoded_at", pa.float64()),  # unix time, for time-to-first-codes
        ("reason", pa.string()),
        ("error", pa.string()),
    ]
)

# Writers → driver, for the summary.
STATS = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("seconds", pa.float64()),
        ("encoded_at", pa.float64()),
        ("reason", pa.string()),
        ("text_source", pa.string()),  # null for a failed chunk
    ]
)


def failure_reason(exc: BaseException) -> str:
    """A short machine-readable class for a ``failures/`` row."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(exc, AudioError):
        return "bad_audio"
    return "codec_error"


def decode_batch(
    table: pa.Table,
    *,
    sample_rate: int,
    hop: int,
    batch_size: int,
    max_pad: float,
    skip: frozenset[str] = frozenset(),
) -> pa.Table:
    """CPU step: a window of chunks rows → BATCHES rows (packed codec batches of similar
    length, plus one row for the chunks that could not be decoded)."""
    if skip:
        table = table.filter(
            pc.invert(pc.is_in(table["chunk_id"], value_set=pa.array(sorted(skip))))
        )
    ok: list[tuple[dict, np.ndarray]] = []
    bad: list[dict] = []
    for r in table.to_pylist():
        meta = {k: r.get(k) for k in ("chunk_id", "video_id", "captions", "turns")}
        try:
            ok.append((meta, decode_pcm(r["audio"] or b"", sample_rate)))
        except AudioError as exc:
            reason = "corrupt_flac" if "cannot decode FLAC" in str(exc) else "bad_audio"
            bad.append({**meta, "samples": 0, "reason": reason, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the stage
            error = f"{type(exc).__name__}: {exc}"
            bad.append({**meta, "samples": 0, "reason": "decode_error", "error": error})
    rows = []
    for group in plan_batches([len(p) for _, p in ok], batch_size, max_pad):
        pcm = pad_batch([ok[i][1] for i in group], hop)
        chunks = [
            {**ok[i][0], "samples": len(ok[i][1]), "reason": None, "error": None} for i in group
        ]
        rows.append(_batch_row(chunks, pcm.tobytes(), pcm.dtype.str, pcm.shape[1]))
    if bad:
        rows.append(_batch_row(bad, b"", "<i2", 0))
    return pa.Table.from_pylist(rows, schema=BATCHES)


def _batch_row(chunks: list[dict], pcm: bytes, dtype: str, width: int) -> dict:
    keys = ("chunk_id", "video_id", "samples", "captions", "turns", "reason", "error")
    return {**{k: [c[k] for c in chunks] for k in keys}, "pcm": pcm, "dtype": dtype, "width": width}


METRICS = Metrics(
    seconds=Metric(
        "counter", "voxtral_preprocess_audio_seconds", "Audio seconds encoded to codec codes"
    ),
    chunks=Metric("counter", "voxtral_preprocess_chunks", "Chunks encoded to codec codes"),
    failures=Metric(
        "counter", "voxtral_preprocess_failures", "Chunks that failed, by reason", ("reason",)
    ),
    text_seconds=Metric(
        "counter",
        "voxtral_preprocess_text_seconds",
        "Audio seconds of token rows, by where their words came from (captions, asr, none)",
        ("source",),
    ),
    asr_seconds=Metric(
        "counter", "voxtral_preprocess_asr_seconds", "Audio seconds transcribed by Whisper"
    ),
)


class ChunkEncoder:
    """Codec actor: loads the codec once (on its GPU when it has one) and encodes packed
    batches, one per call."""

    def __init__(self, codec_cfg: CodecConfig, pre: PreprocessConfig):
        use_gpu = pre.num_gpus > 0
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("preprocess.num_gpus > 0 but this actor sees no CUDA device")
            # Full fp32: TF32 convolutions change codes the way autocast does (measured by
            # bench/preprocess.py), for a small speed-up. Process-wide on purpose: this actor's
            # process exists only to run this codec (Ray Data's actor pool), and every call
            # and the autocast probe below must see the same precision.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        else:
            torch.set_num_threads(max(1, round(pre.num_cpus)))
        self.codec = load_codec(codec_cfg, "cuda" if use_gpu else "cpu")
        self.autocast = False
        if use_gpu and pre.autocast:
            self.autocast = autocast_keeps_codes(self.codec)
            if not self.autocast:
                log.warning("preprocess.autocast: fp16 changes the codes of a probe clip; off")

    def __call__(self, table: pa.Table) -> pa.Table:
        out: list[dict] = []
        for i in range(len(table)):
            out += self.encode_row(table.slice(i, 1))
        self._count(out)
        return pa.Table.from_pylist(out, schema=ENCODED)

    def encode_row(self, row: pa.Table) -> list[dict]:
        meta = row.drop_columns(["pcm"]).to_pylist()[0]
        info = self.codec.info
        n, width = len(meta["chunk_id"]), meta["width"]
        results: list[np.ndarray | Exception | None] = [None] * n
        if width:
            buf = row["pcm"].chunk(0)[0].as_buffer()
            pcm = np.frombuffer(buf, dtype=np.dtype(meta["dtype"])).reshape(n, width)
            results = list(encode_group(self.codec, pcm, meta["samples"], self.autocast))
        now = time.time()
        rows = []
        for j, res in enumerate(results):
            keys = ("chunk_id", "video_id", "captions", "turns", "reason", "error")
            r = {k: meta[k][j] for k in keys}
            # Whisper's words and language when an ASR pool ran first (a reason it set, such
            # as asr_error, stays: the chunk's codes are made but it gets no token row)
            r["asr_words"] = (meta.get("asr_words") or [None] * n)[j]
            r["language"] = (meta.get("language") or [None] * n)[j]
            r.update(codec=info.name, n_q=info.n_q, frames=0, codes=b"", encoded_at=now)
            r["seconds"] = meta["samples"][j] / info.sample_rate
            if isinstance(res, Exception):
                r.update(reason=failure_reason(res), error=f"{type(res).__name__}: {res}")
            elif res is not None:
                r.update(frames=int(res.shape[1]), codes=codes_to_bytes(res))
            rows.append(r)
        return rows

    def _count(self, rows: list[dict]) -> None:
        ok = [r for r in rows if r["reason"] is None]
        METRICS.record("chunks", len(ok))
        METRICS.record("seconds", sum(r["seconds"] for r in ok))
        for reason, n in Counter(r["reason"] for r in rows if r["reason"]).items():
            METRICS.record("failures", n, reason=reason)


@functools.lru_cache(maxsize=4)
def _text_tokenizer(base: str):
    return load_text_tokenizer(resolve_base(ModelConfig(base=base)))


def tokens_file_name(chunk_ids: Sequence[str]) -> str:
    """A name fixed by the rows, so a retried write task replaces its own file."""
    digest = hashlib.sha1("\n".join(sorted(chunk_ids)).encode()).hexdigest()[:20]
    return f"{TOKENS_DIR}/part-{digest}.parquet"


def token_rows(rows: list[dict], tokenizer) -> tuple[list[dict], list[dict]]:
    """ENCODED rows → (TOKENS rows with timed text ids, rows that failed)."""
    good, bad = [], []
    for r in rows:
        if r["reason"] is not None:
            bad.append(r)
            continue
        try:
            words, source = choose_words(r["captions"], r.get("asr_words"), r.get("turns"))
            ids, starts = timed_text_ids(tokenizer, words)
        except Exception as exc:  # noqa: BLE001 - a failures/ row, not a crashed stage
            bad.append({**r, "reason": "text_error", "error": f"{type(exc).__name__}: {exc}"})
            continue
        keep = {k: r[k] for k in schema.TOKENS.names if k in r}
        good.append(
            {
                **keep,
                "text_ids": ids,
                "text_starts_s": starts,
                "words": words,
                "text_source": source,
                "language": r.get("language"),
            }
        )
    return good, bad


def write_batch(
    table: pa.Table, *, root: str, base: str, failed_before: frozenset[str]
) -> pa.Table:
    """Writer step: timed text ids for the good rows, one token file for them, and a
    ``failures/`` row for each failed chunk. Returns the rows' outcome for the summary."""
    storage = Storage(root)
    good, bad = token_rows(table.to_pylist(), _text_tokenizer(base))
    if good:
        ids = [r["chunk_id"] for r in good]
        storage.write_table(tokens_file_name(ids), pa.Table.from_pylist(good, schema=schema.TOKENS))
    for r in good:
        if r["chunk_id"] in failed_before:
            failures.clear_failure(storage, STAGE, r["chunk_id"])
    for r in bad:
        failures.record_failure(
            storage, STAGE, r["chunk_id"], r["video_id"], r["reason"], r["error"]
        )
    reasons = {r["chunk_id"]: r["reason"] for r in bad}
    sources = {r["chunk_id"]: r["text_source"] for r in good}
    chunk_ids = table["chunk_id"].to_pylist()
    seconds = dict(zip(chunk_ids, table["seconds"].to_pylist(), strict=True))
    for r in good:
        METRICS.record("text_seconds", seconds[r["chunk_id"]], source=r["text_source"])
    return pa.table(
        {
            "chunk_id": table["chunk_id"],
            "seconds": table["seconds"],
            "encoded_at": table["encoded_at"],
            "reason": pa.array([reasons.get(c) for c in chunk_ids], pa.string()),
            "text_source": pa.array([sources.get(c) for c in chunk_ids], pa.string()),
        },
        schema=STATS,
    )
