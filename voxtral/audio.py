"""Small, pure audio helpers shared by every stage: mono down-mix, resampling, FLAC."""

from __future__ import annotations

import io
import math

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
    if not isinstance(wav, torch.Tensor):
        wav = np.asarray(wav)
        if wav.dtype.kind not in "biufc":  # strings, objects (ragged lists), dates
            raise AudioError(f"audio must be real PCM, got dtype {wav.dtype}")
    t = torch.as_tensor(wav)
    if t.dtype == torch.bool or t.is_complex():
        raise AudioError(f"audio must be real PCM, got dtype {t.dtype}")
    if t.dtype == torch.uint8:  # 8-bit PCM is unsigned: silence is 128
        t = (t.to(torch.float32) - 128.0) / 128.0
    elif not t.is_floating_point():
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


MAX_KERNEL = 1 << 20
"""Largest torchaudio resampling kernel (elements, 4 MB) used; past it, libswresample."""
_TA_WIDTH, _TA_ROLLOFF = 6, 0.99  # torchaudio's default lowpass_filter_width and rolloff


def _kernel_size(sr: int, target_sr: int) -> int:
    """Elements of the polyphase kernel torchaudio builds for ``sr`` → ``target_sr``: one
    filter per output phase, as wide as the reduced input rate. It grows with the rates'
    reduced ratio (2,401 → 24,000 Hz: 58 M; 47,999 → 24,000 Hz: 1.2 G)."""
    g = math.gcd(sr, target_sr)
    orig, new = sr // g, target_sr // g
    width = math.ceil(_TA_WIDTH * orig / (min(orig, new) * _TA_ROLLOFF))
    return new * (orig + 2 * width)


def uses_torchaudio(sr: int, target_sr: int) -> bool:
    """Whether ``sr`` → ``target_sr`` is resampled by torchaudio (a small exact kernel: the
    common rates, and rates under ~30 Hz, which libswresample cannot take) rather than by
    libswresample (a filter bank of fixed size whatever the ratio)."""
    return _kernel_size(sr, target_sr) <= MAX_KERNEL


def _check_rates(sr: int, target_sr: int) -> None:
    if sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {sr} → {target_sr}")


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (identity when the rates match), in
    memory bounded at any pair of rates (see :func:`uses_torchaudio`)."""
    _check_rates(sr, target_sr)
    if sr == target_sr:
        return wav
    if uses_torchaudio(sr, target_sr):
        return AF.resample(wav, sr, target_sr)
    rows = wav.detach().cpu().float().reshape(-1, wav.shape[-1]).numpy()
    out = []
    for row in rows:
        rs = _SwrResampler(sr, target_sr)
        out.append(np.concatenate([rs.push(row), rs.flush()]))
    return torch.from_numpy(np.stack(out)).reshape(*wav.shape[:-1], -1)


def prepare(wav: np.ndarray | torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Any PCM at any rate and channel count → mono float32 at ``target_sr``."""
    return resample(as_float_mono(wav), sr, target_sr)


def flac_encode(wav: np.ndarray | torch.Tensor, sr: int) -> bytes:
    """Float audio, ``[T]`` mono or ``[C, T]``, → FLAC bytes (16-bit)."""
    buf = io.BytesIO()
    data = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
    if data.ndim == 2:
        data = data.T
    sf.write(buf, data, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def flac_decode(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes → (mono float32 samples, sample rate); channels are averaged."""
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for corrupt data
        raise AudioError(f"cannot decode FLAC: {exc}") from exc
    return wav.mean(axis=1), sr


# -- streaming resampling ------------------------------------------------------------
_EMPTY = np.zeros(0, np.float32)


class _SwrResampler:
    """libswresample through PyAV, streamed: its polyphase filter bank has a fixed number of
    phases (interpolated between for awkward ratios), so memory stays a few MB at any rate
    and its output lines up in time with torchaudio's."""

    def __init__(self, orig_sr: int, new_sr: int):
        import av

        self.orig = orig_sr
        self._rs = av.AudioResampler(format="flt", layout="mono", rate=new_sr)

    @staticmethod
    def _out(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else _EMPTY

    def push(self, x: np.ndarray) -> np.ndarray:
        import av

        if not len(x):
            return _EMPTY
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x, dtype=np.float32)[None], format="flt", layout="mono"
        )
        frame.sample_rate = self.orig
        return self._out(self._rs.resample(frame))

    def flush(self) -> np.ndarray:
        return self._out(self._rs.resample(None))


class StreamResampler:
    """Block-wise band-limited resampling that matches resampling the whole signal.

    With torchaudio (small kernels, see :func:`uses_torchaudio`) each call keeps ``context``
    input samples on both sides of the part it finalises, so the FIR kernel sees the same
    neighbours it would see in one big call; block edges stay aligned because every
    finalised span is a whole number of kernel phases. Other ratios stream through
    libswresample, which is what :func:`resample` uses for them too.
    """

    def __init__(self, orig_sr: int, new_sr: int):
        _check_rates(orig_sr, new_sr)
        import torchaudio.transforms as T

        g = math.gcd(orig_sr, new_sr)
        self.orig, self.new = orig_sr // g, new_sr // g
        self.identity = orig_sr == new_sr
        self._swr = None
        if not self.identity and not uses_torchaudio(orig_sr, new_sr):
            self._swr = _SwrResampler(orig_sr, new_sr)
            self.context = 0
            return
        self._tf = None if self.identity else T.Resample(orig_sr, new_sr)
        width = 0 if self.identity else int(self._tf.width)
        self.context = self.orig * math.ceil((width + 1) / self.orig)
        self._hist = np.zeros(self.context, np.float32)
        self._buf = np.zeros(0, np.float32)

    def _run(self, seg: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._tf(torch.from_numpy(seg)).numpy()

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed input samples; return the output samples that are now final."""
        x = np.asarray(x, dtype=np.float32)
        if self.identity:
            return x
        if self._swr is not None:
            return self._swr.push(x)
        buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        k, o, n = self.context, self.orig, self.new
        ready = ((len(buf) - k) // o) * o
        if ready <= 0:
            self._buf = buf
            return np.zeros(0, np.float32)
        y = self._run(np.concatenate([self._hist, buf[: ready + k]]))
        out = y[(k // o) * n : ((k + ready) // o) * n]
        self._hist = np.concatenate([self._hist, buf[:ready]])[-k:]
        self._buf = buf[ready:].copy()
        return out

    def flush(self) -> np.ndarray:
        """Finish the stream: the remaining output, as if the signal ended in zeros."""
        if self._swr is not None:
            return self._swr.flush()
        if self.identity or not len(self._buf):
            return np.zeros(0, np.float32)
        k, o, n = self.context, self.orig, self.new
        y = self._run(np.concatenate([self._hist, self._buf]))
        total = math.ceil(len(self._buf) * n / o)
        out = y[(k // o) * n : (k // o) * n + total]
        self._buf = np.zeros(0, np.float32)
        return out
