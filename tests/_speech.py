"""Shared test helpers: a real speech clip and codecs built once per test process."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxtral.codec import Codec, load_codec
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
