"""Benchmark of the preprocess stage: how close the Ray Data pipeline gets to the codec.

Builds a corpus of speech-like chunks (10–30 s, FLAC, one file per "video"), measures the
codec's own batched encode throughput on the device (length-sorted batches of the same
size, host audio in, codes back on the host), then runs the whole stage on the corpus.
Prints one JSON line:

- ``xrt``: the stage's audio seconds per wall second (``run_preprocess``'s summary);
- ``codec_xrt``: the codec alone, same device, same batch size, measured in this run;
- ``efficiency``: ``xrt / codec_xrt``, what the pipeline costs (goal: at least 0.85).

    uv run bench/preprocess.py                  # CPU, about 45 s of the codec's work
    python bench/preprocess.py --device cuda    # one GPU actor, batches of 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch

from voxtral import schema
from voxtral.audio import flac_encode
from voxtral.codec.batching import (
    autocast_keeps_codes,
    decode_chunk,
    encode_alone,
    encode_batch,
    plan_batches,
)
from voxtral.config import DEFAULT_CONFIG, load_config
from voxtral.stages.preprocess import run_preprocess

SR = 24_000


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """A voiced, syllabic signal with pauses: compresses and encodes like speech would."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 200) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    weights = rng.uniform(0.2, 1.0, 8) / np.arange(1, 9)
    voice = sum(w * np.sin((k + 1) * phase) for k, w in enumerate(weights))
    # syllables: on/off segments of 80–250 ms, with a longer pause now and then
    durs = rng.uniform(0.08, 0.25, size=int(seconds * 8) + 8)
    on = (np.arange(durs.size) % 2 == 0) & (rng.random(durs.size) > 0.1)
    edges = np.minimum((np.cumsum(durs) * SR).astype(int), n)
    env = np.repeat(on.astype(np.float32), np.diff(np.concatenate([[0], edges])))[:n]
    env = np.pad(env, (0, n - env.size))
    env = np.convolve(env, np.hanning(481) / np.hanning(481).sum(), mode="same")
    noise = rng.normal(0, 0.004, n)
    return np.clip(0.25 * voice * env + noise, -1, 1).astype(np.float32)


def make_clips(unique: int, seed: int = 0, seconds: tuple[float, float] = (10, 30)) -> list[bytes]:
    """Distinct chunks as FLAC, their lengths drawn from ``seconds`` (default: scrape's bounds)."""
    rng = np.random.default_rng(seed)
    durations = rng.uniform(*seconds, size=unique)
    return [flac_encode(speech_like(float(d), seed + i), SR) for i, d in enumerate(durations)]


def make_corpus(root: str, hours: float, flacs: list[bytes], per_file: int = 60) -> None:
    """Write ``hours`` of chunks as ``chunks/<video>.parquet``: the distinct clips reused
    under new chunk ids (the stage does the same work for each)."""
    seconds_of = [sf.info(io.BytesIO(f)).frames / SR for f in flacs]
    out = Path(root, "chunks")
    out.mkdir(parents=True, exist_ok=True)
    rows, seconds, k, video = [], 0.0, 0, 0

    def flush() -> None:
        nonlocal rows, video
        table = pa.Table.from_pylist(rows, schema=schema.CHUNKS)
        pq.write_table(table, out / f"v{video:05d}.parquet", compression="none")
        rows, video = [], video + 1

    while seconds < hours * 3600:
        i = k % len(flacs)
        rows.append(
            {
                "chunk_id": f"v{video:05d}-c{len(rows):03d}",
                "video_id": f"v{video:05d}",
                "start_s": 0.0,
                "duration_s": seconds_of[i],
                "sample_rate": SR,
                "audio": flacs[i],
                "speech_ratio": 0.8,
                "captions": None,
            }
        )
        seconds += seconds_of[i]
        k += 1
        if len(rows) == per_file:
            flush()
    if rows:
        flush()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_codec(codec, wavs: list, batch_size: int, max_pad: float, seconds: float, device):
    """The codec alone: globally length-sorted batches, host in, host out."""
    pool = list(wavs)
    while sum(len(w) for w in pool) / SR < seconds:
        pool += wavs
    groups = plan_batches([len(w) for w in pool], batch_size, max_pad)
    for g in groups[:2]:  # warm-up (kernels, allocator)
        encode_batch(codec, [pool[i] for i in g])
    sync(device)
    t0 = time.perf_counter()
    for g in groups:
        encode_batch(codec, [pool[i] for i in g])
    sync(device)
    return sum(len(w) for w in pool) / SR / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hours", type=float, default=None, help="corpus size (default: sized")
    p.add_argument("--target-s", type=float, default=45.0, help="...to this much codec time)")
    p.add_argument("--max-hours", type=float, default=100.0)
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=None, help="cpu 8, cuda 64")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--codec", default="encodec")
    p.add_argument("--codec-seconds", type=float, default=None, help="audio for codec_xrt")
    p.add_argument("--unique", type=int, default=64)
    p.add_argument("--extras", action="store_true", help="also check batch/autocast/TF32 codes")
    p.add_argument("--root", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = p.parse_args()
    if args.quick:
        args.unique, args.codec_seconds, args.hours = 4, 4.0, args.hours or 0.004
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    batch = args.batch_size or (64 if cuda else 8)
    codec_s = args.codec_seconds or (3 * 3600 if cuda else 60)

    root = args.root or tempfile.mkdtemp(prefix="voxtral-bench-pre-")
    overrides = [
        f"storage.root={root}",
        f"codec.name={args.codec}",
        # the full codec (the real run's cost) on one stream: the clips have no speaker turns
        "codec.n_q=null",
        "codec.size=full",
        "tokenizer.streams=1",
        f"preprocess.batch_size={batch}",
        f"preprocess.min_actors={args.actors}",
        f"preprocess.max_actors={args.actors}",
        f"preprocess.num_gpus={args.gpus_per_actor if cuda else 0}",
        "text.source=captions",  # the codec path alone: bench/asr.py measures Whisper
    ]
    cfg = load_config(DEFAULT_CONFIG, overrides, env={})
    flacs = make_clips(args.unique, seconds=(2, 5) if args.quick else (10, 30))

    # -- the codec alone, same settings as the actors ------------------------------------
    from voxtral.codec import load_codec

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)  # one actor, one thread (Ray gives a 1-CPU actor one)
    codec = load_codec(cfg.codec, args.device)
    wavs = [decode_chunk(f, SR) for f in flacs]
    codec_xrt = measure_codec(codec, wavs, batch, cfg.preprocess.max_pad, codec_s, args.device)
    print(f"codec_xrt {codec_xrt:.1f}", file=sys.stderr)
    extras: dict = {}
    if args.extras:
        extras = check_codes(codec, wavs[: min(len(wavs), batch)], cuda)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            extras["codec_xrt_tf32"] = round(
                measure_codec(codec, wavs, batch, cfg.preprocess.max_pad, codec_s / 3, "cuda"), 1
            )
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic = True
            extras["codec_xrt_deterministic"] = round(
                measure_codec(codec, wavs, batch, cfg.preprocess.max_pad, codec_s / 3, "cuda"), 1
            )
            torch.backends.cudnn.deterministic = False
        print(json.dumps(extras), file=sys.stderr)
    del codec
    if cuda:
        torch.cuda.empty_cache()

    # -- the corpus: about ``target_s`` of the codec's own work, unless --hours ------------
    hours = args.hours
    if hours is None:
        hours = min(args.max_hours, max(0.02, codec_xrt * args.target_s / 3600))
    t0 = time.perf_counter()
    if Path(root, "chunks").is_dir():  # reuse a corpus from an earlier run; redo the stage
        for sub in ("tokens", "failures"):
            shutil.rmtree(Path(root, sub), ignore_errors=True)
    else:
        make_corpus(root, hours, flacs)
    print(f"corpus: {hours:g} h ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # -- the stage -------------------------------------------------------------------------
    from voxtral.ray_utils import init_ray

    init_ray(include_dashboard=False)
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_preprocess(cfg)
    xrt = summary["xrt"]
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    result = {
        "device": device,
        "xrt": round(xrt, 1),
        "codec_xrt": round(codec_xrt, 1),
        "efficiency": round(xrt / codec_xrt, 3),
        "codec": args.codec,
        "batch_size": batch,
        "actors": args.actors,
        "gpus_per_actor": args.gpus_per_actor if cuda else 0,
        "hours": round(summary["audio_hours"], 2),
        "chunks": summary["chunks"],
        "wall_s": round(summary["wall_s"], 1),
        "first_codes_s": round(summary["first_codes_s"], 1),
        "steady_xrt": round(summary["steady_xrt"], 1),
        "steady_efficiency": round(summary["steady_xrt"] / codec_xrt, 3),
        **extras,
    }
    print(json.dumps(result))


def check_codes(codec, wavs: list, cuda: bool) -> dict:
    """On this device: does batching keep every chunk's codes, and does fp16 autocast or
    TF32 change them?"""
    alone = [encode_alone(codec, w) for w in wavs]
    batched = encode_batch(codec, wavs)
    out = {
        "batch_equals_alone": sum(
            bool(np.array_equal(a, b)) for a, b in zip(alone, batched, strict=True)
        ),
        "batch_equals_alone_of": len(wavs),
        "batch_code_agreement": float(
            np.mean([(a == b).mean() for a, b in zip(alone, batched, strict=True)])
        ),
    }
    if cuda:
        out["autocast_identical"] = autocast_keeps_codes(codec)
        half = encode_batch(codec, wavs, autocast=True)
        out["autocast_code_agreement"] = float(
            np.mean([(a == b).mean() for a, b in zip(batched, half, strict=True)])
        )
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = encode_batch(codec, wavs)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        out["tf32_code_agreement"] = float(
            np.mean([(a == b).mean() for a, b in zip(batched, tf32, strict=True)])
        )
        torch.backends.cudnn.deterministic = True
        alone = [encode_alone(codec, w) for w in wavs]
        batched = encode_batch(codec, wavs)
        torch.backends.cudnn.deterministic = False
        out["deterministic_batch_equals_alone"] = sum(
            bool(np.array_equal(a, b)) for a, b in zip(alone, batched, strict=True)
        )
    return out


if __name__ == "__main__":
    main()
