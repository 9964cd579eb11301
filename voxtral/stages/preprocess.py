"""Preprocess (stage 3): every chunk → codec codes and timed text ids, in ``tokens/``.

The Ray Data plan streams ``chunks/`` through three steps:

1. CPU tasks decode a window of chunks (FLAC → PCM at the codec rate), sort it by length
   and pack chunks of similar length into padded codec batches (int16 when that is exact),
   one row per batch. All the per-sample work happens here, on as many cores as there are.
2. An actor pool, each actor holding the codec once on its GPU (CPU when
   ``preprocess.num_gpus`` is 0), encodes one packed batch per call (a copy to the device
   and the codec call; nothing else) and trims each chunk back to its own frames.
   Before them, unless ``text.source=captions``, a pool of ASR actors (each holding Whisper
   once, :mod:`voxtral.asr`) transcribes the chunks that need it (``auto``: those without
   caption words; ``asr``: all) from the same packed PCM and adds their words and language.
3. CPU tasks pick each chunk's words (:func:`choose_words`: Whisper's where it ran, else the
   captions), turn them into base-tokenizer ids at their times, write
   ``tokens/part-*.parquet`` atomically and record failures.

**Why a pool of its own for Whisper.** Whisper is many times the codec's work per second of
audio (large-v3-turbo: a 32-layer encoder over every 30 s window, then a decoder step per
token; EnCodec: a small convolutional encoder), and only the chunks without captions need
it. In the codec actors it would stall the codec for every batch holding such a chunk; as
its own pool each model keeps its own actors busy, each pool is sized (``text.*_actors``,
``text.num_gpus``: fractional GPUs put one ASR and one codec actor on a GPU) to its own
work, Ray Data's backpressure balances the two, and ``captions`` builds no pool at all.

**Batching does not change the codes** (both codecs are causal; see
:mod:`voxtral.codec.batching`, where the per-batch functions live).

**Coverage.** Each token row says where its words came from (``text_source``: ``captions``,
``asr``, ``none``); the summary and the dashboard report the share of audio seconds of each.

**Idempotent reruns.** A chunk is done when its id is in ``tokens/``: token files are
written whole (atomic rename or single PUT) and only after encoding, so a killed run leaves
nothing half-written, and a rerun reads only the chunk files that still hold pending chunks.
Failures are ``failures/preprocess/<chunk>.parquet`` rows; a rerun retries them until
``preprocess.max_attempts``, except audio that cannot be decoded (retrying changes nothing).
Run one preprocess job per ``storage.root`` at a time.

**Codec record.** ``tokens/_codec.json`` names the codec, its codebooks, rates and weights
(:class:`voxtral.codec.CodecInfo`, written by :func:`voxtral.codec.ensure_codec_record`).
A run with another codec on the same root is refused before any work, and training refuses
tokens made with another codec. The leading ``_`` is what Parquet readers (pyarrow, Ray
Data, DuckDB, pandas) skip, so ``tokens/`` opens as a dataset. Earlier runs wrote
``tokens/codec.json``: it is still read, and a preprocess rerun renames it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray
import torch

from voxtral import failures, schema
from voxtral.audio import AudioError
from voxtral.codec import CodecInfo, codec_info, ensure_codec_record, load_codec
from voxtral.codec.batching import (
    autocast_keeps_codes,
    decode_pcm,
    encode_group,
    pad_batch,
    plan_batches,
)
from voxtral.config import CodecConfig, Config, ModelConfig, PreprocessConfig, TextConfig
from voxtral.metrics import Metric, Metrics
from voxtral.model import load_text_tokenizer, resolve_base
from voxtral.ray_utils import read_parquet
from voxtral.schema import TOKENS_DIR, codes_to_bytes
from voxtral.stages import report
from voxtral.storage import Storage
from voxtral.tokenizer import timed_text_ids

log = logging.getLogger(__name__)

STAGE = "preprocess"
PERMANENT_REASONS = frozenset({"corrupt_flac", "bad_audio"})
"""Failures a rerun does not retry: the chunk's bytes are what they are."""
ASR_ERROR = "asr_error"
"""Reason of a chunk Whisper failed on (retried by reruns, like a codec error)."""

# Decode tasks → codec actors: one row per codec batch. ``pcm`` is ``[n, width]`` in C order
# of ``dtype`` (``<i2``: value / 32768 is the sample; ``<f4``), width = the longest chunk's
# whole frames; a row of chunks that failed to decode has width 0 and no pcm.
BATCHES = pa.schema(
    [
        ("chunk_id", pa.list_(pa.string())),
        ("video_id", pa.list_(pa.string())),
        ("samples", pa.list_(pa.int64())),
        ("captions", pa.list_(pa.list_(schema.CAPTION_WORD))),
        ("reason", pa.list_(pa.string())),  # null while the chunk is fine
        ("error", pa.list_(pa.string())),
        ("pcm", pa.large_binary()),
        ("dtype", pa.string()),
        ("width", pa.int64()),
    ]
)

# ASR actors → codec actors: BATCHES plus, per chunk, Whisper's words and language (both
# null where Whisper did not run on the chunk).
TRANSCRIBED = pa.schema(
    [
        *BATCHES,
        ("asr_words", pa.list_(pa.list_(schema.WORD))),
        ("language", pa.list_(pa.string())),
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


# -- per-chunk functions -------------------------------------------------------------------
def failure_reason(exc: BaseException) -> str:
    """A short machine-readable class for a ``failures/`` row."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(exc, AudioError):
        return "bad_audio"
    return "codec_error"


def has_words(words: Sequence[dict] | None) -> bool:
    """Whether a word list holds at least one word that is not blank."""
    return any((w.get("word") or "").strip() for w in words or () if w)


def needs_asr(captions: Sequence[dict] | None, source: str) -> bool:
    """Whether Whisper runs on a chunk: ``asr`` always, ``auto`` where the chunk has no
    caption words, ``captions`` never."""
    return source == "asr" or (source == "auto" and not has_words(captions))


def as_words(words: Sequence[dict] | None) -> list[dict]:
    """Caption or Whisper words → :data:`voxtral.schema.WORD` dicts, time-ordered, blanks
    dropped; ``speaker`` kept as text where the source has one (chunk rows from before
    diarisation have none), else null."""
    out = []
    for w in words or ():
        if not w or not (w.get("word") or "").strip():
            continue
        speaker = w.get("speaker")
        out.append(
            {
                "word": w["word"].strip(),
                "start_s": float(w["start_s"]),
                "end_s": float(w["end_s"] if w.get("end_s") is not None else w["start_s"]),
                "speaker": None if speaker is None else str(speaker),
            }
        )
    return sorted(out, key=lambda w: w["start_s"])


def choose_words(
    captions: Sequence[dict] | None, asr_words: Sequence[dict] | None
) -> tuple[list[dict], str]:
    """A chunk's words and their ``text_source``: Whisper's where it ran on the chunk
    (``asr_words`` not null: the plan ran it only where ``text.source`` asks), else the
    captions; ``none`` when the chosen source holds no word."""
    if asr_words is not None:
        words = as_words(asr_words)
        return words, "asr" if words else "none"
    words = as_words(captions)
    return words, "captions" if words else "none"


def chunk_pcm(meta: dict, pcm: bytes) -> list[np.ndarray]:
    """A packed BATCHES row's PCM → each chunk's own float32 samples (no padding)."""
    n, width = len(meta["chunk_id"]), meta["width"]
    if not width:
        return [np.zeros(0, np.float32)] * n
    dtype = np.dtype(meta["dtype"])
    rows = np.frombuffer(pcm, dtype=dtype).reshape(n, width)
    scale = np.float32(1 / 32768) if dtype.kind == "i" else np.float32(1)
    return [rows[j, : meta["samples"][j]].astype(np.float32) * scale for j in range(n)]


def transcribe_row(transcriber, meta: dict, pcm: bytes, sample_rate: int, source: str) -> dict:
    """ASR step on one BATCHES row (``meta``: its columns but ``pcm``): Whisper on the
    chunks that need it (and decoded fine), in one batch; a chunk Whisper fails on gets an
    ``asr_error`` reason (its codes are still computed, but it gets no token row)."""
    n = len(meta["chunk_id"])
    out = {**meta, "asr_words": [None] * n, "language": [None] * n}
    out["reason"], out["error"] = list(meta["reason"]), list(meta["error"])
    todo = [
        j for j in range(n) if meta["reason"][j] is None and needs_asr(meta["captions"][j], source)
    ]
    if not todo:
        return out
    wavs = chunk_pcm(meta, pcm)
    results = transcriber.transcribe_each([wavs[j] for j in todo], sample_rate)
    for j, res in zip(todo, results, strict=True):
        if isinstance(res, Exception):
            reason = "out_of_memory" if isinstance(res, torch.cuda.OutOfMemoryError) else ASR_ERROR
            out["reason"][j], out["error"][j] = reason, f"{type(res).__name__}: {res}"
        else:
            out["asr_words"][j] = as_words(res.words)
            out["language"][j] = res.language
    return out


# -- Ray Data steps (thin wrappers around the functions above) -----------------------------
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
        meta = {"chunk_id": r["chunk_id"], "video_id": r["video_id"], "captions": r["captions"]}
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
    keys = ("chunk_id", "video_id", "samples", "captions", "reason", "error")
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


class ChunkTranscriber:
    """ASR actor: loads Whisper once (on its GPU when it has one) and adds Whisper's words to
    packed batches, one per call (:func:`transcribe_row`)."""

    def __init__(self, text: TextConfig, sample_rate: int):
        from voxtral.asr import Transcriber

        use_gpu = text.num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("text.num_gpus > 0 but this ASR actor sees no CUDA device")
        if not use_gpu:
            torch.set_num_threads(max(1, round(text.num_cpus)))
        self.source, self.sample_rate = text.source, sample_rate
        self.transcriber = Transcriber(
            text.asr_model,
            device="cuda" if use_gpu else "cpu",
            dtype=text.dtype,
            batch_size=text.batch_size,
            max_new_tokens=text.max_new_tokens,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for i in range(len(table)):
            row = table.slice(i, 1)
            meta = row.drop_columns(["pcm"]).to_pylist()[0]
            pcm = row["pcm"].chunk(0)[0].as_buffer() if meta["width"] else b""
            out = transcribe_row(self.transcriber, meta, pcm, self.sample_rate, self.source)
            seconds = sum(
                meta["samples"][j] / self.sample_rate
                for j, words in enumerate(out["asr_words"])
                if words is not None
            )
            METRICS.record("asr_seconds", seconds)
            rows.append(out)
        return with_pcm(rows, table["pcm"])


def with_pcm(rows: list[dict], pcm: pa.ChunkedArray) -> pa.Table:
    """TRANSCRIBED rows (all but ``pcm``) + the batches' ``pcm`` column, passed on uncopied."""
    meta = TRANSCRIBED.remove(TRANSCRIBED.get_field_index("pcm"))
    table = pa.Table.from_pylist(rows, schema=meta).append_column("pcm", pcm)
    return table.select(TRANSCRIBED.names).cast(TRANSCRIBED)


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
            r = {k: meta[k][j] for k in ("chunk_id", "video_id", "captions", "reason", "error")}
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
            words, source = choose_words(r["captions"], r.get("asr_words"))
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


# -- the stage -----------------------------------------------------------------------------
def done_chunk_ids(storage: Storage) -> set[str]:
    """Chunk ids that already have token rows."""
    table = storage.read_table(TOKENS_DIR, columns=["chunk_id"])
    return set() if table is None else set(table["chunk_id"].to_pylist())


def pending_chunks(storage: Storage, skip: set[str]) -> tuple[list[str], frozenset[str], int]:
    """(chunk files holding pending chunks, skipped ids inside those files, pending count).

    Reads only the ``chunk_id`` column, so a rerun over a finished corpus reads no audio.
    """
    files = storage.parquet_files("chunks")
    if not files:
        return [], frozenset(), 0
    ids = pds.dataset(files, format="parquet", filesystem=storage.fs).to_table(
        columns=["chunk_id", "__filename"]
    )
    pending: set[str] = set()
    skipped_by_file: dict[str, list[str]] = {}
    count = 0
    for cid, path in zip(ids["chunk_id"].to_pylist(), ids["__filename"].to_pylist(), strict=True):
        if cid in skip:
            skipped_by_file.setdefault(path, []).append(cid)
        else:
            pending.add(path)
            count += 1
    inner_skip = frozenset(c for p in pending for c in skipped_by_file.get(p, ()))
    return sorted(pending), inner_skip, count


def decode_task_memory(window: int, max_chunk_s: float, sample_rate: int) -> int:
    """Bytes a decode task may hold at once: its window as FLAC, as PCM and packed (at most
    2 bytes a sample each, plus float32 for one chunk), and a worker's imports."""
    samples = max_chunk_s * sample_rate
    return int(window * samples * 6 + samples * 8 + (768 << 20))


def run_preprocess(cfg: Config) -> dict[str, Any]:
    """Encode every chunk not yet in ``tokens/`` on the connected Ray; return the summary."""
    t0, t0_unix = time.perf_counter(), time.time()
    pre = cfg.preprocess
    storage = Storage(cfg.storage.root)
    info = codec_info(cfg.codec)
    ensure_codec_record(storage, cfg.codec)
    done = done_chunk_ids(storage)
    failed = failures.read_failures(storage, STAGE)
    exhausted = failures.given_up(failed, pre.max_attempts, PERMANENT_REASONS) - done
    files, inner_skip, n_pending = pending_chunks(storage, done | exhausted)

    stats: list[pa.Table] = []
    if files:
        _warn_if_no_gpus(pre, cfg.text)
        ds = read_parquet(files, storage.fs, ["chunk_id", "video_id", "audio", "captions"])
        ds = ds.map_batches(
            decode_batch,
            batch_size=pre.sort_window,
            batch_format="pyarrow",
            fn_kwargs={
                "sample_rate": info.sample_rate,
                "hop": info.hop,
                "batch_size": pre.batch_size,
                "max_pad": pre.max_pad,
                "skip": inner_skip,
            },
            num_cpus=1,
            # Declared so Ray packs no more decode tasks on a node than its memory holds.
            # It also keeps decoding in CPU tasks: Ray Data would otherwise fuse it into the
            # codec actors, where it would stall the GPU.
            memory=decode_task_memory(pre.sort_window, cfg.scrape.max_chunk_s, info.sample_rate),
        )
        if cfg.text.source != "captions":
            ds = ds.map_batches(
                ChunkTranscriber,
                fn_constructor_kwargs={"text": cfg.text, "sample_rate": info.sample_rate},
                batch_size=1,  # one packed batch per call, as the codec actors take them
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    min_size=cfg.text.min_actors, max_size=cfg.text.max_actors
                ),
                num_gpus=cfg.text.num_gpus,
                num_cpus=cfg.text.num_cpus,
            )
        ds = ds.map_batches(
            ChunkEncoder,
            fn_constructor_kwargs={"codec_cfg": cfg.codec, "pre": pre},
            batch_size=1,  # one packed codec batch per call
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=pre.min_actors, max_size=pre.max_actors),
            num_gpus=pre.num_gpus,
            num_cpus=pre.num_cpus,
        )
        ds = ds.map_batches(
            write_batch,
            batch_size=pre.write_rows,
            batch_format="pyarrow",
            fn_kwargs={
                "root": storage.root_uri,
                "base": cfg.model.base,
                "failed_before": frozenset(r["item_id"] for r in failed),
            },
        )
        stats = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))

    summary = summarize(stats, time.perf_counter() - t0, t0_unix, info)
    summary.update(already_done=len(done), skipped_failed=len(exhausted), pending=n_pending)
    return summary


def _warn_if_no_gpus(pre: PreprocessConfig, text: TextConfig) -> None:
    if ray.cluster_resources().get("GPU"):
        return
    if pre.num_gpus > 0:
        log.warning(
            "preprocess.num_gpus=%s but the cluster has no GPU now; the codec actors wait "
            "for one (set preprocess.num_gpus=0 to encode on CPU)",
            pre.num_gpus,
        )
    if text.source != "captions" and text.num_gpus > 0:
        log.warning(
            "text.num_gpus=%s but the cluster has no GPU now; the ASR actors wait for one "
            "(set text.num_gpus=0 to transcribe on CPU)",
            text.num_gpus,
        )


def summarize(
    stats: Sequence[pa.Table], wall_s: float, t0_unix: float, info: CodecInfo
) -> dict[str, Any]:
    """The writers' outcome rows → counts, audio hours and x-realtime of this run.

    ``first_codes_s`` is the start-up (planning, workers, codec load, first window);
    ``steady_xrt`` the rate from the first codes on, what a long run tends to."""
    rows = [r for t in stats for r in t.to_pylist()]
    ok = [r for r in rows if r["reason"] is None]
    reasons = Counter(r["reason"] for r in rows if r["reason"] is not None)
    seconds = sum(r["seconds"] for r in ok)
    stamps = [r["encoded_at"] for r in ok]
    first = min(stamps) - t0_unix if stamps else 0.0
    # rows stamped at the first call were encoded before it: count them out of the rate
    after_first = sum(r["seconds"] for r in ok if r["encoded_at"] > min(stamps, default=0))
    span = max(stamps, default=0) - min(stamps, default=0)
    text_seconds = {k: 0.0 for k in schema.TEXT_SOURCES}
    for r in ok:
        text_seconds[r.get("text_source") or "none"] += r["seconds"]
    return {
        "stage": STAGE,
        "codec": info.name,
        "n_q": info.n_q,
        "chunks": len(ok),
        "failures": sum(reasons.values()),
        "failures_by_reason": dict(sorted(reasons.items())),
        "audio_hours": seconds / 3600,
        "wall_s": wall_s,
        "xrt": seconds / wall_s if wall_s > 0 else 0.0,
        "first_codes_s": first,
        "steady_xrt": after_first / span if span > 0 else 0.0,
        "text_seconds": text_seconds,
        "text_share": {k: v / seconds if seconds else 0.0 for k, v in text_seconds.items()},
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary table printed at the end of the stage."""
    return report.table(
        "preprocess summary",
        [
            ("codec", f"{s['codec']} (n_q={s['n_q']})"),
            ("chunks encoded", s["chunks"]),
            ("already done", s.get("already_done", 0)),
            ("failures", f"{s['failures']}{report.by_reason(s['failures_by_reason'])}"),
            ("skipped (max attempts)", s.get("skipped_failed", 0)),
            ("audio hours", f"{s['audio_hours']:.3f}"),
            ("wall time (s)", f"{s['wall_s']:.1f}"),
            ("x-realtime", f"{s['xrt']:.1f}"),
            ("first codes after (s)", f"{s['first_codes_s']:.1f}"),
            ("x-realtime after that", f"{s['steady_xrt']:.1f}"),
            ("words (share of audio)", format_coverage(s.get("text_share", {}))),
        ],
    )


def format_coverage(share: dict[str, float]) -> str:
    """``captions 62.0% · asr 30.1% · none 7.9%``: where the words of this run's audio came
    from."""
    return " · ".join(f"{k} {100 * share.get(k, 0.0):.1f}%" for k in schema.TEXT_SOURCES)
