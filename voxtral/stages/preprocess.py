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

**Why batching does not change the codes.** Both codecs are causal: frame ``f`` depends
only on samples up to the end of frame ``f``. In a batch every chunk is padded with zeros to
the longest one, so each chunk is encoded as its audio followed by silence up to whole
frames, exactly what :func:`encode_alone` feeds the codec for one chunk, and keeps
``ceil(samples / hop)`` frames. (Feeding the codec a partial last frame instead would let its
own edge padding, ``reflect`` for EnCodec, decide that frame, so it would depend on the
batch.) The tests check the equality for every chunk of the sample corpus: bit-exact for
EnCodec on CPU. Floating point is the limit: Mimi's encoder transformer sums over the padded
length in another order, and GPU kernels are picked per shape, so the last bits can differ
and a code flips where two codebook entries are near ties (bench/preprocess.py measures it).

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
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from voxtral import failures, schema
from voxtral.audio import AudioError, flac_decode, prepare
from voxtral.codec import (
    Codec,
    CodecInfo,
    codec_info,
    ensure_codec_record,
    load_codec,
)
from voxtral.config import CodecConfig, Config, ModelConfig, PreprocessConfig
from voxtral.schema import TOKENS_DIR, codes_to_bytes
from voxtral.storage import Storage
from voxtral.tokenizer import timed_text_ids

log = logging.getLogger(__name__)

STAGE = "preprocess"
PCM16_SCALE = 32768.0
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
def decode_chunk(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → mono float32 samples at the codec rate (the tokenizer's own path)."""
    wav, sr = flac_decode(audio)
    return prepare(wav, sr, target_sr).numpy()


def as_pcm16(wav: np.ndarray) -> np.ndarray | None:
    """The int16 samples whose ``/ 32768`` is exactly ``wav``, or None if there are none.

    16-bit FLAC at the codec rate decodes to such samples: shipping them as int16 halves
    what goes through the object store and to the GPU, and changes no value.
    """
    scaled = wav * np.float32(PCM16_SCALE)
    if scaled.size and (scaled.min() < -PCM16_SCALE or scaled.max() > PCM16_SCALE - 1):
        return None
    pcm = scaled.astype(np.int16)
    return pcm if np.array_equal(pcm, scaled) else None


def decode_pcm(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → PCM at the codec rate: int16 when exact, else float32."""
    wav = decode_chunk(audio, target_sr)
    pcm = as_pcm16(wav)
    return wav if pcm is None else pcm


def text_track(tokenizer, captions: Sequence[dict] | None) -> tuple[list[int], list[float]]:
    """Caption words → base-tokenizer ids, each at its word's start; empty without captions.

    Words are put in time order first, so the ids are time-ordered whatever the source did.
    """
    words = sorted(
        (w for w in captions or () if w and (w.get("word") or "").strip()),
        key=lambda w: float(w["start_s"]),
    )
    words = [{**w, "word": w["word"].strip()} for w in words]
    return timed_text_ids(tokenizer, words)


def plan_batches(lengths: Sequence[int], max_batch: int, max_pad: float) -> list[list[int]]:
    """Group indices of similar length: at most ``max_batch`` per group, and at most
    ``max_pad`` of a group's padded samples are padding. Longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            padded = longest * (len(group) + 1)
            if len(group) < max_batch and (padded - total - lengths[i]) <= max_pad * padded:
                group.append(i)
                total += lengths[i]
                continue
        groups.append([i])
        total = lengths[i]
    return groups


def pad_batch(pcms: Sequence[np.ndarray], hop: int) -> np.ndarray:
    """Chunks → ``[n, width]`` zero-padded to the longest one's whole frames; int16 if every
    chunk is int16 PCM, else float32 (int16 rows scaled by 1/32768, exactly)."""
    frames = [math.ceil(len(p) / hop) for p in pcms]
    if not pcms or min(frames) < 1:
        raise AudioError("chunk holds no samples")
    pcm16 = all(p.dtype == np.int16 for p in pcms)
    out = np.zeros((len(pcms), max(frames) * hop), dtype=np.int16 if pcm16 else np.float32)
    for i, p in enumerate(pcms):
        out[i, : len(p)] = p if pcm16 or p.dtype != np.int16 else p / np.float32(PCM16_SCALE)
    return out


def _autocast(codec: Codec, enabled: bool):
    if enabled and codec.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def encode_padded(
    codec: Codec, pcm: np.ndarray, samples: Sequence[int], autocast: bool = False
) -> list[np.ndarray]:
    """One codec call on a padded ``[n, width]`` batch; each chunk keeps exactly
    ``ceil(samples / hop)`` frames. Returns int16 ``[n_q, frames]`` arrays."""
    info = codec.info
    frames = [info.frames(n) for n in samples]
    if min(frames) < 1:
        raise AudioError("chunk holds no samples")
    if pcm.shape != (len(samples), pcm.shape[1]) or pcm.shape[1] < max(frames) * info.hop:
        raise ValueError(f"pcm {pcm.shape} does not hold {len(samples)} chunks of {samples}")
    with warnings.catch_warnings():  # a read-only view of the object store; only copied
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(pcm)
    x = x.to(codec.device)
    if x.dtype == torch.int16:
        x = x.float().div_(PCM16_SCALE)  # exact: the same floats as decoding to float32
    with _autocast(codec, autocast):
        codes = codec.encode(x[:, None, :])
    codes = codes.to("cpu", torch.int16).numpy()
    if codes.shape[1] != info.n_q or codes.shape[2] < max(frames):
        raise ValueError(f"codec returned {codes.shape}, expected [{len(samples)}, {info.n_q}, ≥F]")
    out = [codes[i, :, :f] for i, f in enumerate(frames)]
    for c in out:
        if c.min() < 0 or c.max() >= info.codebook_size:
            raise ValueError(f"codec returned codes outside [0, {info.codebook_size})")
    return out


def encode_group(
    codec: Codec, pcm: np.ndarray, samples: Sequence[int], autocast: bool = False
) -> list[np.ndarray | Exception]:
    """Encode a packed batch; if the codec rejects it, retry one chunk at a time so only
    the chunk at fault becomes an exception (later a ``failures/`` row)."""
    try:
        return list(encode_padded(codec, pcm, samples, autocast))
    except Exception as exc:  # noqa: BLE001 - isolated below, one chunk at a time
        if len(samples) == 1:
            return [exc]
        log.warning("codec batch of %d failed (%s); encoding one by one", len(samples), exc)
        _release_cuda_memory()
    results: list[np.ndarray | Exception] = []
    for i, n in enumerate(samples):
        width = codec.info.frames(n) * codec.info.hop
        try:
            results.append(encode_padded(codec, pcm[i : i + 1, :width], [n], autocast)[0])
        except Exception as exc:  # noqa: BLE001 - becomes a failures/ row
            results.append(exc)
    return results


def encode_batch(codec: Codec, wavs: Sequence[np.ndarray], autocast: bool = False) -> list:
    """Float chunks → codes in one codec call (pad, encode, trim)."""
    return encode_padded(codec, pad_batch(wavs, codec.info.hop), [len(w) for w in wavs], autocast)


def encode_alone(codec: Codec, wav: np.ndarray) -> np.ndarray:
    """One chunk on its own: the reference that batched encoding must reproduce."""
    return encode_batch(codec, [wav])[0]


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure_reason(exc: BaseException) -> str:
    """A short machine-readable class for a ``failures/`` row."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(exc, AudioError):
        return "bad_audio"
    return "codec_error"


def probe_clip(sample_rate: int, seconds: float = 3.0) -> np.ndarray:
    """A fixed speech-like clip (voiced bursts with pitch glides and a little noise)."""
    t = np.arange(int(sample_rate * seconds), dtype=np.float64) / sample_rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    noise = np.random.default_rng(0).standard_normal(t.size) * 0.01
    return (0.2 * voiced * envelope + noise).astype(np.float32)


def autocast_keeps_codes(codec: Codec, seconds: float = 3.0) -> bool:
    """Whether half-precision autocast gives the same codes as fp32 on a probe clip."""
    if codec.device.type != "cuda":
        return False
    clip = probe_clip(codec.sample_rate, seconds)
    return bool(np.array_equal(encode_alone(codec, clip), encode_batch(codec, [clip], True)[0]))


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


def _counters() -> dict | None:
    try:
        from ray.util.metrics import Counter as RayCounter

        return {
            "seconds": RayCounter(
                "voxtral_preprocess_audio_seconds", "Audio seconds encoded to codec codes"
            ),
            "chunks": RayCounter("voxtral_preprocess_chunks", "Chunks encoded to codec codes"),
            "failures": RayCounter(
                "voxtral_preprocess_failures", "Chunks that failed, by reason", ("reason",)
            ),
        }
    except Exception:  # noqa: BLE001 - metrics are optional outside a Ray worker
        return None


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
        self.metrics = _counters()

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
        if self.metrics is None:
            return
        ok = [r for r in rows if r["reason"] is None]
        if ok:
            self.metrics["chunks"].inc(len(ok))
            self.metrics["seconds"].inc(sum(r["seconds"] for r in ok))
        for reason, n in Counter(r["reason"] for r in rows if r["reason"]).items():
            self.metrics["failures"].inc(n, tags={"reason": reason})


@functools.lru_cache(maxsize=4)
def _text_tokenizer(base: str):
    from voxtral.model import load_text_tokenizer, resolve_base

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
            ids, starts = text_track(tokenizer, r["captions"])
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
    import pyarrow.dataset as pds

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
    """Encode every chunk not yet in ``tokens/``; print and return the stage summary."""
    import ray

    from voxtral.ray_utils import init_ray, read_parquet

    t0, t0_unix = time.perf_counter(), time.time()
    pre = cfg.preprocess
    storage = Storage(cfg.storage.root)
    info = codec_info(cfg.codec)
    ensure_codec_record(storage, cfg.codec)
    done = done_chunk_ids(storage)
    failed = failures.read_failures(storage, STAGE)
    exhausted = {
        r["item_id"]
        for r in failed
        if (r["attempts"] >= pre.max_attempts or r["reason"] in PERMANENT_REASONS)
        and r["item_id"] not in done
    }
    files, inner_skip, n_pending = pending_chunks(storage, done | exhausted)

    stats: list[pa.Table] = []
    if files:
        init_ray()
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
    print(format_summary(summary), flush=True)
    return summary


def _warn_if_no_gpus(pre: PreprocessConfig) -> None:
    import ray

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
    reasons = ", ".join(f"{k}: {v}" for k, v in s["failures_by_reason"].items())
    lines = [
        ("codec", f"{s['codec']} (n_q={s['n_q']})"),
        ("chunks encoded", s["chunks"]),
        ("already done", s.get("already_done", 0)),
        ("failures", f"{s['failures']}" + (f" ({reasons})" if reasons else "")),
        ("skipped (max attempts)", s.get("skipped_failed", 0)),
        ("audio hours", f"{s['audio_hours']:.3f}"),
        ("wall time (s)", f"{s['wall_s']:.1f}"),
        ("x-realtime", f"{s['xrt']:.1f}"),
        ("first codes after (s)", f"{s['first_codes_s']:.1f}"),
        ("x-realtime after that", f"{s['steady_xrt']:.1f}"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(["preprocess summary", *(f"  {k:<{width}}  {v}" for k, v in lines)])
