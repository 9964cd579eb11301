"""Cutting a stream into chunks at pauses, in bounded memory.

``ChunkPlanner`` turns per-frame speech probabilities (from ``voxtral.vad``, fed block by
block so a 3-hour video never sits in memory) into chunks between ``min_s`` and ``max_s``,
cut in the longest pause available, with the silence at each chunk's edges trimmed.

Everything here works on frame indices (one frame = ``voxtral.vad.FRAME_S``); callers turn
frames into samples at their own rate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from voxtral.vad import hysteresis, off_threshold


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
    ):
        if not 0 < min_frames <= max_frames:
            raise ValueError("need 0 < min_frames <= max_frames")
        self.min, self.max, self.pad = min_frames, max_frames, min(pad_frames, min_frames // 2)
        self.on = threshold
        self.off = off_threshold(threshold)
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


class SampleWindow:
    """The decoded stream from the earliest sample a future chunk may use, as blocks: the
    caller drops what the planner has passed (:attr:`ChunkPlanner.pos`), so memory holds at
    most one chunk's span plus a block. Blocks are ``[n]`` or ``[channels, n]`` (all alike):
    samples run along the last axis."""

    def __init__(self) -> None:
        self.blocks: deque[np.ndarray] = deque()
        self.start = 0
        self.end = 0

    def append(self, x: np.ndarray) -> None:
        self.blocks.append(x)
        self.end += x.shape[-1]

    def drop_before(self, i: int) -> None:
        while self.blocks and self.start + self.blocks[0].shape[-1] <= i:
            self.start += self.blocks.popleft().shape[-1]

    def slice(self, a: int, b: int) -> np.ndarray:
        out, pos = [], self.start
        for blk in self.blocks:
            n = blk.shape[-1]
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                out.append(blk[..., lo - pos : hi - pos])
            pos += n
            if pos >= b:
                break
        return np.concatenate(out, axis=-1) if out else np.zeros(0, np.float32)
