"""Preprocess (stage 3): every chunk → codec codes and timed text ids, in ``tokens/``.

The Ray Data plan streams ``chunks/`` through three steps:

1. CPU tasks decode FLAC, resample to the codec rate if needed, turn caption words into
   base-tokenizer ids at their times, and sort a window of chunks by length, so that
   neighbours in the stream have similar lengths.
2. An actor pool, each actor holding the codec once on its GPU (CPU when
   ``preprocess.num_gpus`` is 0), encodes batches of similar length in one call and trims
   each chunk back to its own ``ceil(samples / hop)`` frames.
3. CPU tasks write ``tokens/part-*.parquet`` atomically and record failures.

**Why batching does not change the codes.** Both codecs are causal: frame ``f`` depends
only on samples before the end of frame ``f``. A batch pads every chunk with zeros to the
longest one, so every chunk is encoded as its audio followed by silence up to whole frames,
exactly what :func:`encode_alone` feeds the codec for one chunk. (Feeding the codec a partial
last frame instead would let its own edge padding, ``reflect`` for EnCodec, decide that
frame's codes, so the result would depend on the batch.) The tests check the equality for
every chunk of the sample corpus. With EnCodec on CPU it is bit-exact. Mimi's encoder
transformer sums over the padded length in another order, so the last bits of its latents can
differ with the batch: codebook 0 matches, and deeper codebooks can flip where two entries
are near ties (often, with random weights).

**Idempotent reruns.** A chunk is done when its id is in ``tokens/``: token files are
written whole (atomic rename or single PUT) and only after encoding, so a killed run leaves
nothing half-written, and a rerun reads only the chunk files that still hold pending chunks.
Failures are ``failures/preprocess/<chunk>.parquet`` rows and are retried until
``preprocess.max_attempts``. Run one preprocess job per ``storage.root`` at a time.

**Codec record.** ``tokens/codec.json`` names the codec, its codebooks, rates and weights.
A run with another codec on the same root is refused before any work, and training calls
:func:`check_codec_compatible` to refuse tokens made with another codec.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
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
from voxtral.codec import Codec, CodecInfo, codec_info, load_codec
from voxtral.config import CodecConfig, Config, ModelConfig, PreprocessConfig
from voxtral.storage import Storage
from voxtral.tokenizer import Layout, timed_text_ids

log = logging.getLogger(__name__)

STAGE = "preprocess"
TOKENS_DIR = "tokens"
CODEC_JSON = f"{TOKENS_DIR}/codec.json"
PCM16_SCALE = 32768.0

# Between the decode tasks and the codec actors: one row per chunk, ``pcm`` at the codec
# rate (int16 when that is exact, as for 16-bit FLAC at the codec rate; float32 otherwise).
DECODED = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("video_id", pa.string()),
        ("pcm", pa.binary()),
        ("pcm16", pa.bool_()),
        ("samples", pa.int64()),
        ("seconds", pa.float64()),
        ("text_ids", pa.list_(pa.int32())),
        ("text_starts_s", pa.list_(pa.float32())),
        ("reason", pa.string()),  # null when the chunk is fine so far
        ("error", pa.string()),
    ]
)

# Between the codec actors and the writers: a TOKENS row plus its outcome.
ENCODED = pa.schema(
    [
        *schema.TOKENS,
        ("seconds", pa.float64()),
        ("reason", pa.string()),
        ("error", pa.string()),
    ]
)

# What the writers hand back to the driver for the summary.
STATS = pa.schema([("chunk_id", pa.string()), ("seconds", pa.float64()), ("reason", pa.string())])


class CodecMismatchError(ValueError):
    """Tokens made with another codec (name, codebooks, rates or weights) than expected."""


# -- codec record --------------------------------------------------------------------------
def codec_record(cfg: CodecConfig) -> dict[str, Any]:
    """What ``tokens/codec.json`` says about the codec that made the codes."""
    info = codec_info(cfg)
    return {
        "name": info.name,
        "n_q": info.n_q,
        "codebook_size": info.codebook_size,
        "sample_rate": info.sample_rate,
        "frame_rate": info.frame_rate,
        "weights": _weights_name(cfg),
        **({"bandwidth": cfg.bandwidth} if info.name == "encodec" else {}),
    }


def _weights_name(cfg: CodecConfig) -> str:
    if cfg.pretrained is True:
        return "pretrained"
    if cfg.pretrained is False:
        return "random"
    return str(cfg.pretrained)


def _expected_record(expected: Layout | CodecInfo | CodecConfig) -> dict[str, Any]:
    if isinstance(expected, CodecConfig):
        return codec_record(expected)
    if isinstance(expected, Layout):
        v = expected.vocab
        return {
            "name": expected.codec,
            "n_q": v.n_q,
            "codebook_size": v.codebook_size,
            "sample_rate": expected.sample_rate,
            "frame_rate": expected.frame_rate,
        }
    if isinstance(expected, CodecInfo):
        return {
            "name": expected.name,
            "n_q": expected.n_q,
            "codebook_size": expected.codebook_size,
            "sample_rate": expected.sample_rate,
            "frame_rate": expected.frame_rate,
        }
    raise TypeError(f"expected a Layout, CodecInfo or CodecConfig, got {type(expected).__name__}")


def _describe(rec: dict[str, Any]) -> str:
    weights = f", {rec['weights']} weights" if rec.get("weights") else ""
    return (
        f"{rec.get('name')} (n_q={rec.get('n_q')}, {rec.get('codebook_size')} codes, "
        f"{rec.get('sample_rate')} Hz, {rec.get('frame_rate'):g} frames/s{weights})"
    )


def record_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The keys of ``expected`` whose values ``found`` does not share."""
    diffs = []
    for key, want in expected.items():
        got = found.get(key)
        same = (
            got is not None and math.isclose(float(got), float(want))
            if key == "frame_rate"
            else got == want
        )
        if not same:
            diffs.append(f"{key} {got!r} ≠ {want!r}")
    return diffs


def check_codec_compatible(
    storage: Storage, expected: Layout | CodecInfo | CodecConfig
) -> dict[str, Any]:
    """Refuse tokens made with another codec than ``expected``; return ``tokens/codec.json``.

    ``expected`` is the model's layout (training, serving), a codec's numbers, or a codec
    config (which also pins the weights: random-init and pretrained codes are unrelated).
    """
    if not storage.exists(CODEC_JSON):
        raise FileNotFoundError(
            f"{storage.uri(CODEC_JSON)} not found: no tokens here yet; run preprocess first"
        )
    found = storage.read_json(CODEC_JSON)
    want = _expected_record(expected)
    diffs = record_differences(found, want)
    if diffs:
        raise CodecMismatchError(
            f"tokens under {storage.uri(TOKENS_DIR)} were made with {_describe(found)}, but "
            f"{_describe(want)} is expected ({'; '.join(diffs)}). Re-run preprocess with this "
            "codec into another storage.root, or use the codec config that made these tokens."
        )
    return found


def ensure_codec_record(storage: Storage, cfg: CodecConfig) -> dict[str, Any]:
    """Write ``tokens/codec.json`` on the first run; later runs must use the same codec."""
    if storage.exists(CODEC_JSON):
        return check_codec_compatible(storage, cfg)
    rec = codec_record(cfg)
    storage.write_json(CODEC_JSON, rec)
    return rec


# -- per-row functions ---------------------------------------------------------------------
def decode_chunk(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → mono float32 samples at the codec rate (the tokenizer's own path)."""
    wav, sr = flac_decode(audio)
    return prepare(wav, sr, target_sr).numpy()


def as_pcm16(wav: np.ndarray) -> np.ndarray | None:
    """The int16 samples whose ``/ 32768`` is exactly ``wav``, or None if there are none.

    16-bit FLAC at the codec rate decodes to such samples: shipping them as int16 halves
    what goes through the object store to the codec actors, and changes no value.
    """
    scaled = wav * np.float32(PCM16_SCALE)
    if scaled.size and (scaled.min() < -PCM16_SCALE or scaled.max() > PCM16_SCALE - 1):
        return None
    pcm = scaled.astype(np.int16)
    return pcm if np.array_equal(pcm, scaled) else None


def pcm_to_float(pcm: bytes, pcm16: bool) -> np.ndarray:
    if pcm16:
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(PCM16_SCALE)
    return np.frombuffer(pcm, dtype="<f4")


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


def _autocast(codec: Codec, enabled: bool):
    if enabled and codec.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def encode_batch(codec: Codec, wavs: Sequence[np.ndarray], autocast: bool = False) -> list:
    """Encode chunks in one codec call; each keeps exactly ``ceil(samples / hop)`` frames.

    Every chunk is padded with zeros to the longest one's whole frames; the frames of the
    padding are cut off again. Returns int16 ``[n_q, frames]`` arrays.
    """
    info = codec.info
    frames = [info.frames(len(w)) for w in wavs]
    if min(frames) < 1:
        raise AudioError("chunk holds no samples")
    x = np.zeros((len(wavs), 1, max(frames) * info.hop), dtype=np.float32)
    for i, w in enumerate(wavs):
        x[i, 0, : len(w)] = w
    batch = torch.from_numpy(x)
    if codec.device.type == "cuda":
        batch = batch.pin_memory().to(codec.device, non_blocking=True)
    with _autocast(codec, autocast):
        codes = codec.encode(batch)
    codes = codes.to("cpu", torch.int16).numpy()
    if codes.shape[1] != info.n_q or codes.shape[2] < max(frames):
        raise ValueError(f"codec returned {codes.shape}, expected [{len(wavs)}, {info.n_q}, ≥F]")
    out = [codes[i, :, :f] for i, f in enumerate(frames)]
    for c in out:
        if c.size and (c.min() < 0 or c.max() >= info.codebook_size):
            raise ValueError(f"codec returned codes outside [0, {info.codebook_size})")
    return out


def encode_alone(codec: Codec, wav: np.ndarray) -> np.ndarray:
    """One chunk on its own: the reference that batched encoding must reproduce."""
    return encode_batch(codec, [wav])[0]


def encode_rows(
    codec: Codec,
    wavs: Sequence[np.ndarray],
    max_batch: int,
    max_pad: float = 0.25,
    autocast: bool = False,
) -> list[np.ndarray | Exception]:
    """Encode many chunks in length-bucketed batches; a chunk the codec rejects becomes its
    exception (the batch is retried one chunk at a time so the others still get codes)."""
    results: list[np.ndarray | Exception] = [ValueError("not encoded")] * len(wavs)
    for group in plan_batches([len(w) for w in wavs], max_batch, max_pad):
        try:
            for i, codes in zip(
                group, encode_batch(codec, [wavs[i] for i in group], autocast), strict=True
            ):
                results[i] = codes
            continue
        except Exception as exc:  # noqa: BLE001 - isolated below, one chunk at a time
            if len(group) == 1:
                results[group[0]] = exc
                continue
            log.warning("codec batch of %d failed (%s); encoding one by one", len(group), exc)
            _release_cuda_memory()
        for i in group:
            try:
                results[i] = encode_alone(codec, wavs[i])
            except Exception as exc:  # noqa: BLE001 - becomes a failures/ row
                results[i] = exc
    return results


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


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """``[n_q, frames]`` codes → the ``codes`` column: int16 little-endian, C order."""
    return np.ascontiguousarray(codes, dtype="<i2").tobytes()


def codes_from_bytes(data: bytes, n_q: int, frames: int) -> np.ndarray:
    """The ``codes`` column → ``[n_q, frames]`` int16."""
    arr = np.frombuffer(data, dtype="<i2")
    if arr.size != n_q * frames:
        raise ValueError(f"codes hold {arr.size} values, expected {n_q}×{frames}")
    return arr.reshape(n_q, frames)


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
@functools.lru_cache(maxsize=4)
def _text_tokenizer(base: str):
    from voxtral.model import load_text_tokenizer, resolve_base

    return load_text_tokenizer(resolve_base(ModelConfig(base=base)))


def decode_batch(
    table: pa.Table, *, sample_rate: int, base: str, skip: frozenset[str] = frozenset()
) -> pa.Table:
    """CPU step: chunks rows → DECODED rows, longest first (see module docstring)."""
    if skip:
        table = table.filter(
            pc.invert(pc.is_in(table["chunk_id"], value_set=pa.array(sorted(skip))))
        )
    tokenizer = _text_tokenizer(base)
    rows = []
    for r in table.to_pylist():
        out = {"chunk_id": r["chunk_id"], "video_id": r["video_id"], "pcm16": False}
        out.update(pcm=b"", samples=0, seconds=0.0, text_ids=[], text_starts_s=[])
        out.update(reason=None, error=None)
        try:
            wav = decode_chunk(r["audio"] or b"", sample_rate)
            pcm = as_pcm16(wav)
            out.update(pcm16=pcm is not None, samples=int(wav.size))
            out.update(pcm=(pcm if pcm is not None else wav).tobytes())
            out["seconds"] = wav.size / sample_rate
            ids, starts = text_track(tokenizer, r.get("captions"))
            out.update(text_ids=ids, text_starts_s=starts)
        except AudioError as exc:
            reason = "corrupt_flac" if "cannot decode FLAC" in str(exc) else "bad_audio"
            out.update(reason=reason, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the stage
            out.update(reason="decode_error", error=f"{type(exc).__name__}: {exc}")
        rows.append(out)
    rows.sort(key=lambda o: -o["samples"])
    return pa.Table.from_pylist(rows, schema=DECODED)


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
    """Codec actor: loads the codec once (on its GPU when it has one) and encodes batches."""

    def __init__(self, codec_cfg: CodecConfig, pre: PreprocessConfig):
        use_gpu = pre.num_gpus > 0
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("preprocess.num_gpus > 0 but this actor sees no CUDA device")
            # Full fp32: TF32 convolutions would change codes the same way autocast does.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        else:
            torch.set_num_threads(max(1, round(pre.num_cpus)))
        self.codec = load_codec(codec_cfg, "cuda" if use_gpu else "cpu")
        self.batch_size, self.max_pad = pre.batch_size, pre.max_pad
        self.autocast = False
        if use_gpu and pre.autocast:
            self.autocast = autocast_keeps_codes(self.codec)
            if not self.autocast:
                log.warning("preprocess.autocast: fp16 changes the codes of a probe clip; off")
        self.metrics = _counters()

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["reason"] is None]
        wavs = [pcm_to_float(rows[i]["pcm"], rows[i]["pcm16"]) for i in todo]
        results = encode_rows(self.codec, wavs, self.batch_size, self.max_pad, self.autocast)
        info = self.codec.info
        out = []
        for r in rows:
            out.append(
                {
                    "chunk_id": r["chunk_id"],
                    "video_id": r["video_id"],
                    "codec": info.name,
                    "n_q": info.n_q,
                    "frames": 0,
                    "codes": b"",
                    "text_ids": r["text_ids"],
                    "text_starts_s": r["text_starts_s"],
                    "seconds": r["seconds"],
                    "reason": r["reason"],
                    "error": r["error"],
                }
            )
        for i, res in zip(todo, results, strict=True):
            if isinstance(res, Exception):
                out[i].update(reason=failure_reason(res), error=f"{type(res).__name__}: {res}")
            else:
                out[i].update(frames=int(res.shape[1]), codes=codes_to_bytes(res))
        self._count(out)
        return pa.Table.from_pylist(out, schema=ENCODED)

    def _count(self, rows: list[dict]) -> None:
        if self.metrics is None:
            return
        ok = [r for r in rows if r["reason"] is None]
        if ok:
            self.metrics["chunks"].inc(len(ok))
            self.metrics["seconds"].inc(sum(r["seconds"] for r in ok))
        for reason, n in Counter(r["reason"] for r in rows if r["reason"]).items():
            self.metrics["failures"].inc(n, tags={"reason": reason})


def tokens_file_name(chunk_ids: Sequence[str]) -> str:
    """A name fixed by the rows, so a retried write task replaces its own file."""
    digest = hashlib.sha1("\n".join(sorted(chunk_ids)).encode()).hexdigest()[:20]
    return f"{TOKENS_DIR}/part-{digest}.parquet"


def write_batch(table: pa.Table, *, root: str, failed_before: frozenset[str]) -> pa.Table:
    """Writer step: good rows → one token file; failed rows → ``failures/`` rows."""
    storage = Storage(root)
    ok = pc.is_null(table["reason"])
    good = table.filter(ok).select(schema.TOKENS.names).cast(schema.TOKENS)
    if len(good):
        storage.write_table(tokens_file_name(good["chunk_id"].to_pylist()), good)
    for cid in good["chunk_id"].to_pylist():
        if cid in failed_before:
            failures.clear_failure(storage, STAGE, cid)
    for r in (
        table.filter(pc.invert(ok)).select(["chunk_id", "video_id", "reason", "error"]).to_pylist()
    ):
        failures.record_failure(
            storage, STAGE, r["chunk_id"], r["video_id"], r["reason"], r["error"]
        )
    return pa.table(
        {
            "chunk_id": table["chunk_id"],
            "seconds": table["seconds"],
            "reason": table["reason"],
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
    """Bytes a decode task may hold: its window of chunks as FLAC in, PCM out, and one
    float32 chunk being converted."""
    per_chunk = max_chunk_s * sample_rate * (2 + 2)  # FLAC (≤ 16-bit PCM) + int16 PCM
    return int(window * per_chunk + max_chunk_s * sample_rate * 4 + (64 << 20))


def run_preprocess(cfg: Config) -> dict[str, Any]:
    """Encode every chunk not yet in ``tokens/``; print and return the stage summary."""
    import ray

    from voxtral.ray_utils import init_ray

    t0 = time.perf_counter()
    pre = cfg.preprocess
    storage = Storage(cfg.storage.root)
    info = codec_info(cfg.codec)
    ensure_codec_record(storage, cfg.codec)
    done = done_chunk_ids(storage)
    attempts = failures.attempts(storage, STAGE)
    exhausted = {cid for cid, n in attempts.items() if n >= pre.max_attempts and cid not in done}
    files, inner_skip, n_pending = pending_chunks(storage, done | exhausted)

    stats: list[pa.Table] = []
    if files:
        init_ray()
        _warn_if_no_gpus(pre)
        ds = ray.data.read_parquet(files, filesystem=storage.fs).select_columns(
            ["chunk_id", "video_id", "audio", "captions"]
        )
        ds = ds.map_batches(
            decode_batch,
            batch_size=pre.sort_window,
            batch_format="pyarrow",
            fn_kwargs={"sample_rate": info.sample_rate, "base": cfg.model.base, "skip": inner_skip},
            num_cpus=1,
            # A window of decoded audio, declared so Ray packs no more decode tasks on a
            # node than its memory holds. Also keeps decoding in CPU tasks: Ray Data would
            # otherwise fuse it into the codec actors, where it would stall the GPU.
            memory=decode_task_memory(pre.sort_window, cfg.scrape.max_chunk_s, info.sample_rate),
        )
        ds = ds.map_batches(
            ChunkEncoder,
            fn_constructor_kwargs={"codec_cfg": cfg.codec, "pre": pre},
            batch_size=pre.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=pre.min_actors, max_size=pre.max_actors),
            num_gpus=pre.num_gpus,
            num_cpus=pre.num_cpus,
        )
        ds = ds.map_batches(
            write_batch,
            batch_size=pre.write_rows,
            batch_format="pyarrow",
            fn_kwargs={"root": storage.root_uri, "failed_before": frozenset(attempts)},
        )
        stats = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))

    summary = summarize(stats, time.perf_counter() - t0, info)
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


def summarize(stats: Sequence[pa.Table], wall_s: float, info: CodecInfo) -> dict[str, Any]:
    """The writers' outcome rows → counts, audio hours and x-realtime of this run."""
    rows = [r for t in stats for r in t.to_pylist()]
    ok = [r for r in rows if r["reason"] is None]
    reasons = Counter(r["reason"] for r in rows if r["reason"] is not None)
    seconds = sum(r["seconds"] for r in ok)
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
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(["preprocess summary", *(f"  {k:<{width}}  {v}" for k, v in lines)])
