"""Words and speakers: how fast Whisper and the diariser run, and how well the diariser does.

    uv run bench/asr.py                       # CPU, the tiny Whisper, every sample dialogue
    uv run bench/asr.py --quick               # seconds of work, the same keys
    python bench/asr.py --device cuda --model openai/whisper-large-v3-turbo

Prints one JSON line:

- ``asr_xrt``: audio seconds per wall second of :class:`voxtral.asr.Transcriber`, batched
  (``text.batch_size`` windows per call), on chunks of mixed lengths cut from the sample
  dialogues; ``asr_xrt_alone`` is the same chunks one at a time, measured in the same run,
  and ``asr_batch_speedup`` their ratio;
- ``diarize_xrt``: audio seconds per wall second of :func:`voxtral.diarize.diarize_file`
  (stream decode, silero VAD, speaker embeddings, clustering), as the scrape runs it;
- ``der``: the diarisation error rate over every sample dialogue against its ``.rttm``
  ground truth (``pyannote.metrics``, 0.25 s collar, overlap scored), and ``der_by_file``.

With the tiny random Whisper the words are nonsense and ``asr_xrt`` only shows the mechanics'
cost; the real model is named with ``--model`` (it needs the Hugging Face hub or a local copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from voxtral.config import DEFAULT_CONFIG, load_config  # noqa: E402

SAMPLE = REPO / "data" / "sample"
RATE = 16_000


def dialogues() -> list[Path]:
    """The sample dialogues that have a ground-truth turn file."""
    return sorted(
        p
        for p in SAMPLE.iterdir()
        if p.suffix not in (".rttm", ".vtt", ".py") and p.with_suffix(".rttm").is_file()
    )


def chunks_of(paths: list[Path], count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` chunks of 5–28 s (mixed lengths, as the scrape cuts them) at 16 kHz."""
    from voxtral.media import decode_stream

    rng = np.random.default_rng(seed)
    audio = [np.concatenate(list(decode_stream(str(p), RATE))) for p in paths]
    out = []
    for i in range(count):
        wav = audio[i % len(audio)]
        n = int(rng.uniform(5, 28) * RATE)
        start = int(rng.integers(0, max(1, len(wav) - n)))
        out.append(wav[start : start + n])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="Whisper (default: the local profile's, tiny)")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    files = dialogues()
    if args.quick:
        args.chunks, files = 4, files[:1]
    if args.device == "cpu":
        torch.set_num_threads(1)  # one actor, one core, as the CPU pools run
    cfg = load_config(DEFAULT_CONFIG, [f"diarize.device={args.device}"], env={})

    from voxtral.asr import Transcriber
    from voxtral.diarize import der, diarize_file, read_rttm, voice_encoder

    # -- speech recognition: batched, then one chunk at a time ---------------------------
    t = cfg.text
    asr = Transcriber(
        args.model or t.asr_model,
        args.device,
        dtype=t.dtype,
        batch_size=t.batch_size,
        max_new_tokens=t.max_new_tokens,
    )
    chunks = chunks_of(files, args.chunks)
    seconds = sum(len(c) for c in chunks) / RATE
    asr.transcribe(chunks[:1], RATE)  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    batched = asr.transcribe(chunks, RATE)
    asr_xrt = seconds / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for c in chunks:
        asr.transcribe([c], RATE)
    alone_xrt = seconds / (time.perf_counter() - t0)
    del asr

    # -- diarisation, as the scrape runs it, scored against the ground truth --------------
    voice_encoder(args.device)  # loaded once per worker, as the scrape tasks do
    by_file, errors, total, audio_s, wall_s = {}, 0.0, 0.0, 0.0, 0.0
    for path in files:
        t0 = time.perf_counter()
        result = diarize_file(str(path), cfg.diarize, cfg.scrape.vad_threshold)
        wall_s += time.perf_counter() - t0
        audio_s += result.audio_s
        score = der(read_rttm(str(path.with_suffix(".rttm"))), result.turns)
        by_file[path.stem] = round(score["der"], 4)
        errors += score["der"] * score["total"]
        total += score["total"]
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    )
    print(
        json.dumps(
            {
                "device": device,
                "asr_model": args.model or t.asr_model,
                "asr_xrt": round(asr_xrt, 2),
                "asr_xrt_alone": round(alone_xrt, 2),
                "asr_batch_speedup": round(asr_xrt / alone_xrt, 2),
                "asr_chunks": len(chunks),
                "asr_words": sum(len(x.words) for x in batched),
                "diarize_xrt": round(audio_s / wall_s, 1),
                "der": round(errors / total, 4) if total else None,
                "der_by_file": by_file,
                "audio_s": round(audio_s, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
