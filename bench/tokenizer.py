"""Multimodal tokenizer speed: audio → ids and ids → audio, in x realtime.

Prints one JSON line per configuration (codec × batch) with the keys ``codec``, ``device``,
``batch``, ``encode_xrt`` and ``decode_xrt``: audio seconds processed per wall-clock second.
Encode is the preprocess path (codec encode of a batch, then the id layout of every row);
decode is the serve path (ids → codes of every row, then codec decode of the batch).
Codecs are random-init (speed does not depend on the weights), so nothing is downloaded.

    uv run bench/tokenizer.py                  # CPU: both codecs, batch 1 and 8, 60 s each
    uv run bench/tokenizer.py --device cuda    # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from voxtral.codec import load_codec  # noqa: E402
from voxtral.config import CodecConfig, TokenizerConfig  # noqa: E402
from voxtral.interleave import decode_ids, encode_ids  # noqa: E402
from voxtral.layout import make_layout  # noqa: E402

GROUP_MS = {"encodec": 40, "mimi": 80}  # the local profile's groups (Mimi: one frame)
TEXT_SIZE = 32_768  # Mistral-7B-v0.3's vocabulary


def speech_like(seconds: float, sample_rate: int, batch: int) -> torch.Tensor:
    """``[batch, 1, T]``: voiced bursts (harmonics under a syllable-rate envelope) and pauses,
    a different clip per row."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    rows = []
    for b in range(batch):
        f0 = 110 + 40 * b / max(1, batch - 1) + 20 * torch.sin(2 * math.pi * 0.3 * t)
        phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 8))
        envelope = torch.clamp(torch.sin(2 * math.pi * 4 * t + b), min=0) * (
            torch.sin(2 * math.pi * 0.25 * t) > -0.5
        )
        noise = torch.randn(t.shape, generator=g) * 0.02
        rows.append(0.2 * voiced * envelope + noise)
    return torch.stack(rows)[:, None].float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(codec, batch: int, seconds: float, device: torch.device, repeats: int) -> dict:
    name = codec.name
    layout = make_layout(codec.info, TEXT_SIZE, TokenizerConfig(group_ms=GROUP_MS[name]))
    wav = speech_like(seconds, codec.sample_rate, batch)

    def encode() -> list[np.ndarray]:
        codes = codec.encode(wav.to(device)).cpu().numpy()
        return [encode_ids(layout, row) for row in codes]

    def decode(streams: list[np.ndarray]) -> torch.Tensor:
        codes = np.stack([decode_ids(layout, ids)[0] for ids in streams])
        return codec.decode(torch.from_numpy(codes)).cpu()

    # warm up (kernels, allocator, caches) on a short clip
    short = wav[..., : codec.sample_rate * 2]
    codec.decode(codec.encode(short.to(device)))
    sync(device)

    enc_s, dec_s, layout_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        streams = encode()
        sync(device)
        t1 = time.perf_counter()
        out = decode(streams)
        sync(device)
        t2 = time.perf_counter()
        codes = [decode_ids(layout, ids)[0] for ids in streams]
        layout_s.append(time.perf_counter() - t2)
        enc_s.append(t1 - t0)
        dec_s.append(t2 - t1)
    frames = codes[0].shape[1]
    assert out.shape[0] == batch and out.shape[-1] == frames * codec.info.hop
    audio_s = batch * seconds
    return {
        "codec": name,
        "device": device.type,
        "batch": batch,
        "encode_xrt": round(audio_s / min(enc_s), 1),
        "decode_xrt": round(audio_s / min(dec_s), 1),
        "audio_s": audio_s,
        "n_q": codec.n_q,
        "ids_per_row": int(len(streams[0])),
        "ids_to_codes_xrt": round(audio_s / min(layout_s), 1),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per row (default 60)")
    parser.add_argument("--codecs", default="encodec,mimi")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.batches = 4.0, "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")
    for name in args.codecs.split(","):
        codec = load_codec(CodecConfig(name=name), device)
        for batch in (int(b) for b in args.batches.split(",")):
            print(json.dumps(run(codec, batch, args.seconds, device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
