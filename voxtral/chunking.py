"""Finding speech and cutting a stream into chunks at pauses, in bounded memory.

Two streaming pieces, both fed block by block so a 3-hour video never sits in memory:

- ``StreamVAD``: silero-vad (ONNX, the weights from the pip package) turned into a batched
  model. The stock model is called once per 32 ms frame, so the Python call overhead,
  not the network, dominates. Here a window of audio is split into segments that run side
  by side as one batch (one ONNX call advances every segment by a frame), each segment
  primed with a short warm-up from the audio just before it. Segments that are digital
  silence skip the model entirely.
- ``ChunkPlanner``: per-frame probabilities → chunks between ``min_s`` and ``max_s``, cut
  in the longest pause available, with the silence at each chunk's edges trimmed.

Everything here works on frame indices (one frame = ``FRAME_S``); callers turn frames into
samples at their own rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FRAME_S = 0.032
"""One silero-vad frame: 256 samples at 8 kHz, 512 at 16 kHz."""
VAD_RATES = {8000: (256, 32), 16000: (512, 64)}  # rate → (frame samples, context samples)
SILENCE_FLOOR = 10 ** (-60 / 20)
"""Segments whose peak is below -60 dBFS are silence without asking the model."""


@lru_cache(maxsize=1)
def _silero_session():
    """The ONNX session of the packaged silero-vad model, loaded once per process."""
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=True).session


class StreamVAD:
    """Speech probability per ``FRAME_S`` frame of a stream at ``rate`` (8 or 16 kHz)."""

    def __init__(
        self,
        rate: int = 8000,
        segment_frames: int = 256,
        batch: int = 32,
        warmup_frames: int = 8,
    ):
        if rate not in VAD_RATES:
            raise ValueError(f"silero-vad runs at 8000 or 16000 Hz, not {rate}")
        self.rate = rate
        self.frame, self.ctx = VAD_RATES[rate]
        self.seg = segment_frames
        self.batch = batch
        self.warm = warmup_frames
        self.session = _silero_session()
        self._sr = np.array(rate, dtype=np.int64)
        self._lead = self.warm * self.frame + self.ctx
        self._tail = np.zeros(self._lead, np.float32)  # the audio just before the next window
        self._parts: list[np.ndarray] = []  # samples not yet run, in arrival order
        self._pending = 0
        self.model_frames = 0  # frames that went through the model (for benchmarks)

    @property
    def window(self) -> int:
        return self.batch * self.seg * self.frame

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed samples; return probabilities of the frames completed so far."""
        x = np.asarray(x, np.float32)
        if len(x):
            self._parts.append(x)
            self._pending += len(x)
        if self._pending < self.window:
            return np.zeros(0, np.float32)
        buf = np.concatenate(self._parts)
        cut = (len(buf) // self.window) * self.window
        out = [self._run(buf[i : i + self.window]) for i in range(0, cut, self.window)]
        self._parts = [buf[cut:]] if cut < len(buf) else []
        self._pending = len(buf) - cut
        return np.concatenate(out)

    def flush(self) -> np.ndarray:
        """Probabilities of the remaining samples (the last frame zero-padded)."""
        if not self._pending:
            return np.zeros(0, np.float32)
        buf = np.concatenate(self._parts)
        x = np.zeros(-(-len(buf) // self.frame) * self.frame, np.float32)
        x[: len(buf)] = buf
        self._parts, self._pending = [], 0
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        f, c, seg, warm = self.frame, self.ctx, self.seg, self.warm
        n = len(x) // f
        ext = np.concatenate([self._tail, x])
        self._tail = ext[-self._lead :].copy()
        n_seg = -(-n // seg)
        steps = warm + seg
        # model input of frame k (relative to x): [context | frame] = ext[lead-c+k*f : lead+(k+1)*f]
        pad = max(0, (n_seg * seg - n) * f)
        if pad:
            ext = np.concatenate([ext, np.zeros(pad, np.float32)])
        windows = np.lib.stride_tricks.sliding_window_view(ext, c + f)[::f]
        # row j of ``windows`` is frame k = j - warm (since lead = warm*f + c)
        probs = np.zeros(n_seg * seg, np.float32)
        k0 = np.arange(n_seg) * seg  # first real frame of each segment
        rows = k0[:, None] + np.arange(steps)[None, :]  # [n_seg, steps] indices into windows
        live = []
        for b in range(n_seg):
            lo = (k0[b] + warm) * f + c  # sample offset of the segment's first real frame
            hi = lo + seg * f
            if np.abs(ext[max(0, lo - warm * f) : hi]).max(initial=0.0) >= SILENCE_FLOOR:
                live.append(b)
        if live:
            idx = rows[live]  # [B, steps]
            inputs = np.ascontiguousarray(windows[idx.T])  # [steps, B, c+f]
            state = np.zeros((2, len(live), 128), np.float32)
            out = np.empty((steps, len(live)), np.float32)
            for t in range(steps):
                p, state = self.session.run(
                    None, {"input": inputs[t], "state": state, "sr": self._sr}
                )
                out[t] = p[:, 0]
            self.model_frames += steps * len(live)
            probs.reshape(n_seg, seg)[live] = out[warm:].T
        return probs[:n]


@dataclass(frozen=True)
class Chunk:
    """A span of frames ``[start, end)`` and how many of them are speech."""

    start: int
    end: int
    speech: int

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def speech_ratio(self) -> float:
        return self.speech / self.frames if self.frames else 0.0


def hysteresis(probs: np.ndarray, on: float, off: float, state: bool = False) -> np.ndarray:
    """Speech flags: a frame turns speech at ``p >= on`` and stays so until ``p < off``."""
    mark = np.where(probs >= on, 1, np.where(probs < off, 0, -1))
    idx = np.where(mark >= 0, np.arange(len(mark)), -1)
    idx = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(idx >= 0, mark[np.maximum(idx, 0)] == 1, state)


class ChunkPlanner:
    """Turns a stream of per-frame speech probabilities into chunks, as soon as decidable.

    A chunk starts ``pad`` frames before the next speech onset, and is cut in the
    longest pause between ``min_frames`` and ``max_frames`` after its start (at the least
    speech-like frame when there is no pause at all), then its trailing silence is trimmed
    to ``pad``. Only the frames after the last cut are kept.
    """

    def __init__(
        self,
        min_frames: int,
        max_frames: int,
        pad_frames: int = 8,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
    ):
        if not 0 < min_frames <= max_frames:
            raise ValueError("need 0 < min_frames <= max_frames")
        self.min, self.max, self.pad = min_frames, max_frames, min(pad_frames, min_frames // 2)
        self.on = threshold
        self.off = threshold - 0.15 if neg_threshold is None else neg_threshold
        self.base = 0  # global index of _sp[0]
        self.pos = 0  # earliest frame the next chunk may start at
        self._sp = np.zeros(0, bool)
        self._pr = np.zeros(0, np.float32)
        self._state = False
        self.speech_frames = 0

    def push(self, probs: np.ndarray) -> list[Chunk]:
        probs = np.asarray(probs, np.float32)
        if len(probs):
            sp = hysteresis(probs, self.on, self.off, self._state)
            self._state = bool(sp[-1])
            self.speech_frames += int(sp.sum())
            self._sp = np.concatenate([self._sp, sp])
            self._pr = np.concatenate([self._pr, probs])
        return self._plan(final=False)

    def finish(self, probs: np.ndarray | None = None) -> list[Chunk]:
        out = self.push(probs) if probs is not None and len(probs) else []
        return out + self._plan(final=True)

    def _trim(self, keep_from: int) -> None:
        drop = keep_from - self.base
        if drop > 0:
            self._sp, self._pr = self._sp[drop:], self._pr[drop:]
            self.base = keep_from

    def _plan(self, final: bool) -> list[Chunk]:
        chunks: list[Chunk] = []
        while True:
            avail = self.base + len(self._sp)
            onsets = np.flatnonzero(self._sp[self.pos - self.base :])
            if not len(onsets):
                if final:
                    self.pos = avail
                else:
                    self.pos = max(self.pos, avail - self.pad)
                self._trim(self.pos)
                break
            start = max(self.pos, self.pos + int(onsets[0]) - self.pad)
            if not final and avail < start + self.max + self.min + 1:
                # wait for a chunk's worth beyond the window, so the stream's end can
                # still be shared out without leaving a remainder shorter than min
                self.pos = start
                self._trim(start)
                break
            hi = start + self.max
            if final:
                speech_end = min(avail, self._last_speech(start, avail) + 1 + self.pad)
                if speech_end - start <= self.max:  # the last chunk of the stream
                    end = max(speech_end, min(start + self.min, avail))
                    if end - start >= self.min:
                        chunks.append(self._chunk(start, end))
                    self.pos = avail
                    self._trim(avail)
                    break
                hi = max(start + self.min, min(hi, speech_end - self.min))
            cut = self._best_cut(start + self.min, hi, avail)
            end = max(start + self.min, min(cut, self._last_speech(start, cut) + 1 + self.pad))
            chunks.append(self._chunk(start, end))
            self.pos = cut
            self._trim(max(self.base, cut - self.max))
        return chunks

    def _chunk(self, start: int, end: int) -> Chunk:
        return Chunk(start, end, int(self._sp[start - self.base : end - self.base].sum()))

    def _last_speech(self, lo: int, hi: int) -> int:
        idx = np.flatnonzero(self._sp[lo - self.base : hi - self.base])
        return lo + int(idx[-1]) if len(idx) else lo

    def _best_cut(self, lo: int, hi: int, avail: int) -> int:
        """The middle of the longest pause touching ``[lo, hi]`` (clamped into it)."""
        r0 = max(self.base, lo - self.max)
        r1 = min(avail, hi + self.max)
        sil = ~self._sp[r0 - self.base : r1 - self.base]
        if not sil[lo - r0 : hi - r0 + 1].any():
            mid = lo + (hi - lo) // 2
            window = self._pr[mid - self.base : hi + 1 - self.base]
            return mid + len(window) - 1 - int(np.argmin(window[::-1]))  # latest on ties
        edges = np.diff(np.concatenate([[0], sil.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1) + r0, np.flatnonzero(edges == -1) + r0
        touching = (ends > lo) & (starts <= hi)
        starts, ends = starts[touching], ends[touching]
        lengths = ends - starts
        best = len(lengths) - 1 - int(np.argmax(lengths[::-1]))  # longest; the latest on ties
        mid = int(starts[best] + lengths[best] // 2)
        return min(max(mid, lo), hi)
