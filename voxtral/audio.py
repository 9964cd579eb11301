"""Small, pure audio helpers shared by every stage: mono down-mix, resampling, FLAC."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

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


# -- streaming decode --------------------------------------------------------------------
# A long video must never sit in memory whole: the helpers below decode a file packet by
# packet, down-mix by averaging channels and resample in bounded blocks, with an exact
# overlap so the result equals resampling the whole signal at once.


class NotAudioError(AudioError):
    """The file is not audio at all (text, an image, no audio stream)."""


class CorruptAudioError(AudioError):
    """The file looks like media but cannot be decoded (broken container or packets)."""


_EMPTY = np.zeros(0, np.float32)
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}
_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64}
_DTYPES.update({"flt": np.float32, "dbl": np.float64})


def _to_float(a: np.ndarray, name: str) -> np.ndarray:
    if name == "u8":
        return (a.astype(np.float32) - 128.0) / 128.0
    if name in _INT_SCALE:
        return a.astype(np.float32) / _INT_SCALE[name]
    return a.astype(np.float32, copy=False)


class _MonoMixer:
    """Collects decoded frames as zero-copy views and down-mixes them a block at a time.

    Doing the channel average per block instead of per 20 ms frame keeps the Python
    work per frame to a couple of microseconds, which matters at hundreds of x realtime.
    """

    def __init__(self, fmt: str, channels: int):
        self.name = fmt.rstrip("p")
        self.planar = fmt.endswith("p")
        if self.name not in _DTYPES:
            raise CorruptAudioError(f"unsupported sample format {fmt}")
        self.dtype = _DTYPES[self.name]
        self.channels = max(1, channels)
        self.parts: list[list[np.ndarray]] = []
        self.samples = 0

    def add(self, frame) -> None:
        n = frame.samples
        if self.planar:
            views = [np.frombuffer(p, self.dtype, n) for p in frame.planes[: self.channels]]
        else:
            views = [np.frombuffer(frame.planes[0], self.dtype, n * self.channels)]
        self.parts.append(views)
        self.samples += n

    def take(self) -> np.ndarray:
        if not self.parts:
            return _EMPTY
        if self.planar:
            planes = [np.concatenate([p[c] for p in self.parts]) for c in range(self.channels)]
            mono = _to_float(planes[0], self.name)
            for plane in planes[1:]:
                mono = mono + _to_float(plane, self.name)
        else:
            inter = np.concatenate([p[0] for p in self.parts]).reshape(-1, self.channels)
            mono = _to_float(inter, self.name).sum(axis=1, dtype=np.float32)
        if self.channels > 1:
            mono *= np.float32(1.0 / self.channels)
        self.parts, self.samples = [], 0
        return np.ascontiguousarray(mono, dtype=np.float32)


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


@dataclass
class DecodeStats:
    """What the decoder saw, for failure reasons and for the truncation check."""

    source_rate: int = 0
    channels: int = 0
    codec: str = ""
    decoded_s: float = 0.0
    bad_packets: int = 0
    packets: int = 0
    header_duration_s: float | None = None


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in b"\t\r\n\f" for c in head)


def decode_stream(
    path: str, target_sr: int, block_s: float = 5.0, stats: DecodeStats | None = None
) -> Iterator[np.ndarray]:
    """Decode the first audio stream of a file as mono float32 blocks at ``target_sr``.

    Memory stays bounded by ``block_s`` whatever the file's length. Raises
    ``NotAudioError`` for files that are not audio, ``CorruptAudioError`` for media that
    cannot be decoded; isolated bad packets are skipped and counted in ``stats``.
    """
    import av

    stats = stats if stats is not None else DecodeStats()
    if os.path.getsize(path) == 0:
        raise AudioError("file is empty (0 bytes)")
    try:
        container = av.open(path, mode="r")
    except av.error.FFmpegError as exc:
        kind = NotAudioError if _looks_like_text(path) else CorruptAudioError
        raise kind(f"cannot open media: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise NotAudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        stats.codec = stream.codec_context.name
        if container.duration:
            stats.header_duration_s = container.duration / 1_000_000
        key: tuple | None = None
        mixer: _MonoMixer | None = None
        resampler: StreamResampler | None = None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                # The container ends here (often trailing garbage): keep what was decoded;
                # the caller's length check against the header says if that was too little.
                break
            stats.packets += 1
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                stats.bad_packets += 1
                continue
            for frame in frames:
                rate = frame.sample_rate
                fmt = frame.format.name
                if (rate, fmt) != key:
                    channels = len(frame.layout.channels)
                    if resampler is not None and rate == key[0]:
                        yield resampler.push(mixer.take())  # same rate, new sample format
                    elif resampler is not None:
                        yield resampler.push(mixer.take())
                        yield resampler.flush()
                        resampler = None
                    key = (rate, fmt)
                    mixer = _MonoMixer(fmt, channels)
                    if resampler is None:
                        resampler = StreamResampler(rate, target_sr)
                    if not stats.source_rate:
                        stats.source_rate, stats.channels = rate, channels
                mixer.add(frame)
                stats.decoded_s += frame.samples / rate
                if mixer.samples >= block_s * rate:
                    yield resampler.push(mixer.take())
        if resampler is None:
            if _looks_like_text(path):
                raise NotAudioError("the file is text, not audio")
            if stats.packets:
                raise CorruptAudioError(f"none of {stats.packets} audio packets decoded")
            raise AudioError("the audio stream holds no samples")
        yield resampler.push(mixer.take())
        yield resampler.flush()
        if stats.bad_packets > max(3, 0.1 * stats.packets):
            raise CorruptAudioError(
                f"{stats.bad_packets} of {stats.packets} audio packets failed to decode"
            )


def probe_duration(path: str) -> float | None:
    """Duration in seconds from the container header (no decoding); None if unknown."""
    import av

    try:
        with av.open(path, mode="r") as c:
            if not c.streams.audio:
                return None
            s = c.streams.audio[0]
            if s.duration and s.time_base:
                return float(s.duration * s.time_base)
            return c.duration / 1_000_000 if c.duration else None
    except av.error.FFmpegError:
        return None
