"""Preprocess (stage 3): every chunk → codec codes and timed text ids, in ``tokens/``.

The Ray Data plan streams ``chunks/`` through three steps:

1. CPU tasks decode a window of chunks (FLAC → PCM at the codec rate), sort it by length
   and pack chunks of similar length into padded codec batches (int16 when that is exact),
   one row per batch. All the per-sample work happens here, on as many cores as there are.
2. An actor pool, each actor holding the codec once on its GPU (CPU when
   ``preprocess.num_gpus`` is 0), encodes one packed batch per call (a copy to the device
   and the codec call; nothing else) and trims each chunk back to its own frames.
3. CPU tasks turn caption words into base-tokenizer ids at their times, write
   ``tokens/part-*.parquet`` atomically and record failures.

**Batching does not change the codes** (both codecs are causal; see
:mod:`voxtral.codec.batching`, where the per-batch functions live).

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
from voxtral.config import CodecConfig, Config, ModelConfig, PreprocessConfig
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
            r = {k: meta[k][j] for k in ("chunk_id", "video_id", "captions", "reason", "error")}
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
            ids, starts = timed_text_ids(tokenizer, r["captions"])
        except Exception as exc:  # noqa: BLE001 - a failures/ row, not a crashed stage
            bad.append({**r, "reason": "text_error", "error": f"{type(exc).__name__}: {exc}"})
            continue
        keep = {k: r[k] for k in schema.TOKENS.names if k in r}
        good.append({**keep, "text_ids": ids, "text_starts_s": starts})
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
    return pa.table(
        {
            "chunk_id": table["chunk_id"],
            "seconds": table["seconds"],
            "encoded_at": table["encoded_at"],
            "reason": pa.array(
                [reasons.get(c) for c in table["chunk_id"].to_pylist()], pa.string()
            ),
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
        _warn_if_no_gpus(pre)
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


def _warn_if_no_gpus(pre: PreprocessConfig) -> None:
    if pre.num_gpus > 0 and not ray.cluster_resources().get("GPU"):
        log.warning(
            "preprocess.num_gpus=%s but the cluster has no GPU now; the codec actors wait "
            "for one (set preprocess.num_gpus=0 to encode on CPU)",
            pre.num_gpus,
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
        ],
    )
