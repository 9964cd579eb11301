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
from voxtral.stages.preprocess import duplex
from voxtral.storage import Storage
from voxtral.tokenizer import timed_text_ids
from voxtral.tracks import words_of
from voxtral.words import choose_words

log = logging.getLogger(__name__)

STAGE = "preprocess"
PERMANENT_REASONS = frozenset({"corrupt_flac", "bad_audio", duplex.NO_SPEAKERS})
"""Failures a rerun does not retry: the chunk's bytes (and turns) are what they are."""

# Decode tasks → codec actors: one row per codec batch. ``pcm`` is ``[n, width]`` in C order
# of ``dtype`` (``<i2``: value / 32768 is the sample; ``<f4``), width = the longest chunk's
# whole frames; a row of chunks that failed to decode has width 0 and no pcm. Two-stream
# batches (``example_chunk`` not null) hold ``n + 2m`` rows of pcm: see ``duplex``.
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
        ("example_chunk", pa.list_(pa.int32())),  # two streams: each example's chunk
        ("model_speaker", pa.list_(pa.string())),  # two streams: each example's speaker
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
        ("model_speaker", pa.string()),  # two streams only, as in schema.TOKENS
        ("user_codes", pa.binary()),
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
    streams: int = 1,
) -> pa.Table:
    """CPU step: a window of chunks rows → BATCHES rows (packed codec batches of similar
    length, plus one row for the chunks that could not be decoded). ``streams`` 2 packs
    each chunk's duplex examples with it (:mod:`~voxtral.stages.preprocess.duplex`)."""
    if skip:
        table = table.filter(
            pc.invert(pc.is_in(table["chunk_id"], value_set=pa.array(sorted(skip))))
        )
    ok: list[tuple[dict, np.ndarray]] = []
    examples: list[list[duplex.Example]] = []
    bad: list[dict] = []
    for r in table.to_pylist():
        meta = {k: r.get(k) for k in ("chunk_id", "video_id", "captions", "turns")}
        try:
            pcm = decode_pcm(r["audio"] or b"", sample_rate)
            if streams == 2:
                found = duplex.chunk_examples(r, pcm, sample_rate)
                if not found:
                    error = "no speaker turns: a two-stream row needs a model speaker"
                    bad.append({**meta, "samples": 0, "reason": duplex.NO_SPEAKERS, "error": error})
                    continue
                examples.append(found)
            ok.append((meta, pcm))
        except AudioError as exc:
            reason = "corrupt_flac" if "cannot decode FLAC" in str(exc) else "bad_audio"
            bad.append({**meta, "samples": 0, "reason": reason, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the stage
            error = f"{type(exc).__name__}: {exc}"
            bad.append({**meta, "samples": 0, "reason": "decode_error", "error": error})
    rows = []
    if streams == 2:
        decoded = [(meta, pcm, found) for (meta, pcm), found in zip(ok, examples, strict=True)]
        for group, pcm, where, speakers in duplex.pack_chunks(decoded, batch_size, max_pad, hop):
            chunks = [_ok_chunk(*ok[i]) for i in group]
            row = _batch_row(chunks, pcm.tobytes(), pcm.dtype.str, pcm.shape[1])
            rows.append({**row, "example_chunk": where, "model_speaker": speakers})
    else:
        for group in plan_batches([len(p) for _, p in ok], batch_size, max_pad):
            pcm = pad_batch([ok[i][1] for i in group], hop)
            chunks = [_ok_chunk(*ok[i]) for i in group]
            rows.append(_batch_row(chunks, pcm.tobytes(), pcm.dtype.str, pcm.shape[1]))
    if bad:
        row = _batch_row(bad, b"", "<i2", 0)
        rows.append(row if streams == 1 else {**row, "example_chunk": [], "model_speaker": []})
    return pa.Table.from_pylist(rows, schema=BATCHES)


def _ok_chunk(meta: dict, pcm: np.ndarray) -> dict:
    return {**meta, "samples": len(pcm), "reason": None, "error": None}


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
        if meta.get("example_chunk") is not None:
            return self.encode_duplex_row(row, meta)
        n, width = len(meta["chunk_id"]), meta["width"]
        results: list[np.ndarray | Exception | None] = [None] * n
        if width:
            buf = row["pcm"].chunk(0)[0].as_buffer()
            pcm = np.frombuffer(buf, dtype=np.dtype(meta["dtype"])).reshape(n, width)
            results = list(encode_group(self.codec, pcm, meta["samples"], self.autocast))
        now = time.time()
        rows = []
        for j, res in enumerate(results):
            r = self._chunk_row(meta, j, now)
            if isinstance(res, Exception):
                r.update(reason=failure_reason(res), error=f"{type(res).__name__}: {res}")
            elif res is not None:
                r.update(frames=int(res.shape[1]), codes=codes_to_bytes(res))
            rows.append(r)
        return rows

    def encode_duplex_row(self, row: pa.Table, meta: dict) -> list[dict]:
        """A two-stream batch → one row per example (its model and user codes), and one
        per chunk without examples (the failed ones, with their reason)."""
        n, width, where = len(meta["chunk_id"]), meta["width"], meta["example_chunk"]
        results: list = []
        if width:
            buf = row["pcm"].chunk(0)[0].as_buffer()
            rows_pcm = n + 2 * len(where)
            pcm = np.frombuffer(buf, dtype=np.dtype(meta["dtype"])).reshape(rows_pcm, width)
            results = duplex.encode_examples(self.codec, pcm, meta["samples"], where, self.autocast)
        now = time.time()
        rows = []
        for j in range(n):
            if j not in where:
                rows.append(self._chunk_row(meta, j, now))
            for e in (e for e, c in enumerate(where) if c == j):
                r, res = self._chunk_row(meta, j, now), results[e]
                r["model_speaker"] = meta["model_speaker"][e]
                if isinstance(res, Exception):
                    if r["reason"] is None:
                        r.update(reason=failure_reason(res), error=f"{type(res).__name__}: {res}")
                else:
                    model, user = res
                    r.update(frames=int(model.shape[1]), codes=codes_to_bytes(model))
                    r["user_codes"] = codes_to_bytes(user)
                rows.append(r)
        return rows

    def _chunk_row(self, meta: dict, j: int, now: float) -> dict:
        """The ENCODED row of chunk ``j`` of a batch, without codes yet."""
        info, n = self.codec.info, len(meta["chunk_id"])
        keys = ("chunk_id", "video_id", "captions", "turns", "reason", "error")
        r = {k: meta[k][j] for k in keys}
        # Whisper's words and language when an ASR pool ran first (a reason it set, such
        # as asr_error, stays: the chunk's codes are made but it gets no token row)
        r["asr_words"] = (meta.get("asr_words") or [None] * n)[j]
        r["language"] = (meta.get("language") or [None] * n)[j]
        r.update(codec=info.name, n_q=info.n_q, frames=0, codes=b"", encoded_at=now)
        r["seconds"] = meta["samples"][j] / info.sample_rate
        return r

    def _count(self, rows: list[dict]) -> None:
        rows = list(per_chunk(rows).values())  # a chunk's two-stream rows count once
        ok = [r for r in rows if r["reason"] is None]
        METRICS.record("chunks", len(ok))
        METRICS.record("seconds", sum(r["seconds"] for r in ok))
        for reason, n in Counter(r["reason"] for r in rows if r["reason"]).items():
            METRICS.record("failures", n, reason=reason)


def per_chunk(rows: list[dict]) -> dict[str, dict]:
    """One row per chunk id, in order: the first failed row of the chunk if any, else its
    first row (two-stream chunks have a row per example; one-stream rows are unique)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["chunk_id"] not in out or (r.get("reason") and not out[r["chunk_id"]].get("reason")):
            out[r["chunk_id"]] = r
    return out


@functools.lru_cache(maxsize=4)
def _text_tokenizer(base: str):
    return load_text_tokenizer(resolve_base(ModelConfig(base=base)))


def tokens_file_name(chunk_ids: Sequence[str]) -> str:
    """A name fixed by the rows, so a retried write task replaces its own file."""
    digest = hashlib.sha1("\n".join(sorted(chunk_ids)).encode()).hexdigest()[:20]
    return f"{TOKENS_DIR}/part-{digest}.parquet"


def token_rows(rows: list[dict], tokenizer) -> tuple[list[dict], list[dict]]:
    """ENCODED rows → (TOKENS rows with timed text ids, rows that failed). A two-stream row
    keeps only its model speaker's words; its ``text_source`` stays the chunk's (an empty
    text stream from captions or Whisper means "this speaker says nothing here", which is
    not ``none``, "no words known"). A chunk with a failed row fails whole."""
    good, bad = [], []
    for r in rows:
        if r["reason"] is not None:
            bad.append(r)
            continue
        try:
            words, source = choose_words(r["captions"], r.get("asr_words"), r.get("turns"))
            if r.get("model_speaker") is not None:
                words = words_of(words, r["model_speaker"])
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
    failed = per_chunk(bad)
    if any(r["chunk_id"] in failed for r in good):  # a sibling example failed
        for r in good:
            if (f := failed.get(r["chunk_id"])) is not None:
                bad.append({**r, "reason": f["reason"], "error": f["error"]})
        good = [r for r in good if r["chunk_id"] not in failed]
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
    sources = {c: r["text_source"] for c, r in per_chunk(good).items()}
    for c in sources:
        if c in failed_before:
            failures.clear_failure(storage, STAGE, c)
    reasons = {}
    for c, r in per_chunk(bad).items():  # once per chunk: each call counts an attempt
        failures.record_failure(storage, STAGE, c, r["video_id"], r["reason"], r["error"])
        reasons[c] = r["reason"]
    # the summary's rows: one per chunk (a two-stream chunk has a row per example)
    first: dict[str, int] = {}
    for i, c in enumerate(table["chunk_id"].to_pylist()):
        first.setdefault(c, i)
    if len(first) < len(table):
        table = table.take(list(first.values()))
    chunk_ids = table["chunk_id"].to_pylist()
    seconds = dict(zip(chunk_ids, table["seconds"].to_pylist(), strict=True))
    for c, source in sources.items():
        METRICS.record("text_seconds", seconds[c], source=source)
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
