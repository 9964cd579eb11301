"""Shared test helpers: a real speech clip, codecs built once per test process, and the
comparison of codes that float rounding may tip at near ties."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from voxtral.codec import Codec, load_codec
from voxtral.codec.batching import pad_batch
from voxtral.config import REPO_ROOT, CodecConfig

SENTENCE = "Welcome back to the show. Today we talk about speech."


@functools.cache
def speech_clip() -> tuple[np.ndarray, int]:
    """(samples int16 mono, sample rate) of real speech: espeak-ng synthesises it at test time
    (22.05 kHz, so encoding also exercises resampling); else a bundled sample clip."""
    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "speech.wav"
            subprocess.run([espeak, "-w", str(out), SENTENCE], check=True, capture_output=True)
            wav, sr = sf.read(out, dtype="int16")
        return wav, sr
    for path in sorted((REPO_ROOT / "data" / "sample").glob("*")):
        if path.suffix.lower() in (".wav", ".flac", ".ogg"):
            wav, sr = sf.read(path, dtype="int16", always_2d=True)
            return wav[: sr * 8, 0], sr
    pytest.skip("no speech clip: espeak-ng is not installed and data/sample has no audio")


@functools.cache
def codec(name: str, size: str = "full") -> Codec:
    """A random-init codec (Mimi takes several seconds to build: once per process)."""
    return load_codec(CodecConfig(name=name, size=size))


def encodec_tie_margins(codec, wav: np.ndarray) -> np.ndarray:
    """``[n_q, frames]``: how much farther EnCodec's runner-up entry is than the chosen one
    (relative distance), for the chunk encoded alone. Near 0 means a near tie, which
    float rounding of the order of 1e-8 may tip either way."""
    model = codec.model
    x = torch.from_numpy(pad_batch([wav], codec.info.hop))[:, None]
    margins = []
    with torch.no_grad():
        residual = model.encoder(x)
        for layer in model.quantizer.vq.layers[: codec.n_q]:
            r = layer.project_in(residual.transpose(1, 2))[0].double()
            two = torch.cdist(r, layer._codebook.embed.double()).topk(2, largest=False).values
            margins.append(((two[:, 1] - two[:, 0]) / two[:, 1].clamp_min(1e-12)).numpy())
            residual = residual - layer.decode(layer.encode(residual))
    return np.stack(margins)


def assert_same_codes(codec, wav: np.ndarray, got: np.ndarray, want: np.ndarray, what: str):
    """Equal codes, except where float rounding tips a near tie: at such a frame the first
    differing codebook must be a near tie (later ones follow from its residual)."""
    assert got.shape == want.shape, what
    frames = np.flatnonzero((got != want).any(axis=0))
    assert len(frames) <= max(1, 0.01 * got.shape[1]), f"{what}: {len(frames)} frames differ"
    if len(frames):
        margins = encodec_tie_margins(codec, wav)
        for f in frames:
            q = int(np.flatnonzero(got[:, f] != want[:, f])[0])
            assert margins[q, f] < 1e-4, f"{what}: frame {f} codebook {q} is no near tie"
