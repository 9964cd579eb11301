"""Decoding any media file (PyAV) into mono float blocks at a target rate, in bounded memory.

A long video must never sit in memory whole: :func:`decode_stream` decodes a file packet by
packet, down-mixes by averaging channels a block at a time and resamples in bounded blocks
(:class:`voxtral.audio.StreamResampler`, exact to resampling the whole signal at once).
Files that are not audio, and media that cannot be decoded, raise their own
:class:`~voxtral.audio.AudioError` subclass, so the failure row can say which.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from voxtral.audio import AudioError, StreamResampler


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

    def _planes(self) -> list[np.ndarray]:
        if self.planar:
            return [np.concatenate([p[c] for p in self.parts]) for c in range(self.channels)]
        inter = np.concatenate([p[0] for p in self.parts]).reshape(-1, self.channels)
        return [inter[:, c] for c in range(self.channels)]

    def take(self) -> np.ndarray:
        if not self.parts:
            return _EMPTY
        if self.planar:
            planes = self._planes()
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

    def take_stereo(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) of a two-channel stream; any other layout gives its mono mix twice."""
        if self.channels != 2 or not self.parts:
            mono = self.take()
            return mono, mono
        left, right = (np.ascontiguousarray(_to_float(p, self.name)) for p in self._planes())
        self.parts, self.samples = [], 0
        return left, right


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


class _Out:
    """The resampling end of :func:`decode_stream`: one stream resampler per output channel
    (one for mono; left and right with ``stereo``), fed a block at a time."""

    def __init__(self, rate: int, target_sr: int, stereo: bool):
        self.rate, self.stereo = rate, stereo
        self.rs = [StreamResampler(rate, target_sr) for _ in range(2 if stereo else 1)]

    def push(self, mixer: _MonoMixer) -> np.ndarray:
        if not self.stereo:
            return self.rs[0].push(mixer.take())
        return _pair(rs.push(x) for rs, x in zip(self.rs, mixer.take_stereo(), strict=True))

    def flush(self) -> np.ndarray:
        if not self.stereo:
            return self.rs[0].flush()
        return _pair(rs.flush() for rs in self.rs)


def _pair(parts) -> np.ndarray:
    left, right = parts
    n = min(len(left), len(right))  # the same resampler on the same lengths: always equal
    return np.stack([left[:n], right[:n]])


def decode_stream(
    path: str,
    target_sr: int,
    block_s: float = 5.0,
    stats: DecodeStats | None = None,
    stereo: bool = False,
) -> Iterator[np.ndarray]:
    """Decode the first audio stream of a file as mono float32 blocks at ``target_sr``.

    With ``stereo``, a source whose first frame has two channels yields ``[2, n]`` blocks
    (left, right) instead, for a diarisation that can split a two-track recording by
    channel; other layouts still yield mono (and a later frame of another layout, its mix
    in both channels). Memory stays bounded by ``block_s`` whatever the file's length. Raises
    ``NotAudioError`` for files that are not audio, ``CorruptAudioError`` for media that
    cannot be decoded; isolated bad packets are skipped and counted in ``stats``.
    """
    stats = stats if stats is not None else DecodeStats()
    with _open_media(path) as container:
        if not container.streams.audio:
            raise NotAudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        stats.codec = stream.codec_context.name
        if container.duration:
            stats.header_duration_s = container.duration / 1_000_000
        key: tuple | None = None
        mixer: _MonoMixer | None = None
        resampler: _Out | None = None
        for frame in _frames(container, stream, stats):
            rate = frame.sample_rate
            fmt = frame.format.name
            if (rate, fmt) != key:
                channels = len(frame.layout.channels)
                if resampler is not None and rate == key[0]:
                    yield resampler.push(mixer)  # same rate, new sample format
                elif resampler is not None:
                    yield resampler.push(mixer)
                    yield resampler.flush()
                    resampler = None
                key = (rate, fmt)
                mixer = _MonoMixer(fmt, channels)
                if resampler is None:
                    two = stereo and (stats.channels or channels) == 2
                    resampler = _Out(rate, target_sr, two)
                if not stats.source_rate:
                    stats.source_rate, stats.channels = rate, channels
            mixer.add(frame)
            stats.decoded_s += frame.samples / rate
            if mixer.samples >= block_s * rate:
                yield resampler.push(mixer)
        if resampler is None:
            if _looks_like_text(path):
                raise NotAudioError("the file is text, not audio")
            if stats.packets:
                raise CorruptAudioError(f"none of {stats.packets} audio packets decoded")
            raise AudioError("the audio stream holds no samples")
        yield resampler.push(mixer)
        yield resampler.flush()
        if stats.bad_packets > max(3, 0.1 * stats.packets):
            raise CorruptAudioError(
                f"{stats.bad_packets} of {stats.packets} audio packets failed to decode"
            )


def _open_media(path: str):
    """The file opened with PyAV; ``AudioError`` when it is empty, ``NotAudioError`` when it
    is text, ``CorruptAudioError`` when no demuxer takes it."""
    import av

    if os.path.getsize(path) == 0:
        raise AudioError("file is empty (0 bytes)")
    try:
        return av.open(path, mode="r")
    except av.error.FFmpegError as exc:
        kind = NotAudioError if _looks_like_text(path) else CorruptAudioError
        raise kind(f"cannot open media: {exc}") from exc


def _frames(container, stream, stats: DecodeStats) -> Iterator:
    """The stream's decoded frames. A packet that fails to decode is skipped and counted; a
    demuxing error ends the stream (often trailing garbage: the caller's length check
    against the header says whether what was decoded is too little)."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, av.error.FFmpegError):
            return
        stats.packets += 1
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            stats.bad_packets += 1
            continue
        yield from frames


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
