"""Small, pure audio helpers shared by every stage: mono down-mix, resampling, FLAC."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


class AudioError(ValueError):
    """Audio that cannot be used (empty, NaN, wrong dtype, undecodable)."""


def as_float_mono(wav: np.ndarray | torch.Tensor, channels_first: bool = True) -> torch.Tensor:
    """Validate audio and down-mix it to mono float32 by averaging channels.

    Accepts ``[T]`` or ``[C, T]`` (``[T, C]`` when ``channels_first`` is False), float or
    integer PCM. Integer PCM is scaled to [-1, 1].
    """
    t = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
    if t.dtype == torch.bool or t.is_complex():
        raise AudioError(f"audio must be real PCM, got dtype {t.dtype}")
    if not t.is_floating_point():
        info = torch.iinfo(t.dtype)
        t = t.to(torch.float32) / float(max(abs(info.min), info.max))
    t = t.to(torch.float32)
    if t.ndim == 2:
        t = t.mean(dim=0 if channels_first else 1)
    elif t.ndim != 1:
        raise AudioError(f"audio must be [T] or [C, T], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise AudioError("audio is empty")
    if not torch.isfinite(t).all():
        raise AudioError("audio contains NaN or infinite samples")
    return t


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (identity when the rates match)."""
    if sr <= 0:
        raise AudioError(f"sample rate must be positive, got {sr}")
    if sr == target_sr:
        return wav
    return AF.resample(wav, sr, target_sr)


def prepare(wav: np.ndarray | torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Any PCM at any rate and channel count → mono float32 at ``target_sr``."""
    return resample(as_float_mono(wav), sr, target_sr)


def flac_encode(wav: np.ndarray | torch.Tensor, sr: int) -> bytes:
    """Mono float audio → FLAC bytes (16-bit)."""
    buf = io.BytesIO()
    data = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
    sf.write(buf, data, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def flac_decode(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes → (mono float32 samples, sample rate)."""
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for corrupt data
        raise AudioError(f"cannot decode FLAC: {exc}") from exc
    return wav.mean(axis=1), sr
