"""Voice activity: silero-vad (ONNX, 16 kHz) per session, and turn-taking decisions.

One ONNX session is shared by every conversation in the process (``run`` is thread-safe);
each conversation keeps only its own recurrent state, 64 samples of context and a resampler
history, so a session costs a few kilobytes instead of a model load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VAD_RATE = 16_000
WINDOW = 512  # samples at 16 kHz per silero call (32 ms)
CONTEXT = 64
WINDOW_S = WINDOW / VAD_RATE


@lru_cache(maxsize=1)
def _design_lowpass(taps: int = 63, cutoff: float = 7_600.0, rate: float = 48_000.0):
    """Windowed-sinc low-pass for 24 kHz → 16 kHz (×2 up, filter at 48 kHz, ÷3 down)."""
    n = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2 * cutoff / rate * n) * np.hamming(taps)
    return (h / h.sum() * 2).astype(np.float32)  # ×2: zero-stuffing halves the gain


class Resampler24to16:
    """Streaming 24 kHz → 16 kHz with filter history carried across calls (no edge
    artefacts at chunk boundaries that could look like speech onsets)."""

    def __init__(self) -> None:
        self._h = _design_lowpass()
        self._hist = np.zeros(len(self._h) - 1, dtype=np.float32)
        self._phase = 0  # index, in the 48 kHz stream, of the next sample to keep (mod 3)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if not len(x):
            return x
        up = np.zeros(2 * len(x), dtype=np.float32)
        up[::2] = x
        full = np.concatenate([self._hist, up])
        y = np.convolve(full, self._h, mode="valid")  # len == len(up)
        self._hist = full[-(len(self._h) - 1) :]
        keep = y[self._phase :: 3]
        self._phase = (self._phase - len(up)) % 3
        return keep


@lru_cache(maxsize=1)
def _onnx_session():
    from importlib.resources import files

    import onnxruntime as ort

    path = str(files("silero_vad.data").joinpath("silero_vad.onnx"))
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


class SileroStream:
    """Speech probability of every 32 ms window of a 24 kHz stream."""

    def __init__(self) -> None:
        self._session = _onnx_session()
        self._resample = Resampler24to16()
        self._buf = np.zeros(0, dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)
        self._sr = np.array(VAD_RATE, dtype=np.int64)

    def push(self, pcm24: np.ndarray) -> list[float]:
        self._buf = np.concatenate([self._buf, self._resample(pcm24)])
        probs = []
        while len(self._buf) >= WINDOW:
            window, self._buf = self._buf[:WINDOW], self._buf[WINDOW:]
            x = np.concatenate([self._context, window[None]], axis=1)
            out, self._state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr}
            )
            self._context = x[:, -CONTEXT:]
            probs.append(float(out.reshape(-1)[0]))
        return probs


@dataclass
class TurnEvent:
    kind: str  # "start" (the user began speaking) or "end" (the user has finished)
    at_s: float  # stream time (seconds of audio pushed) at which it was decided


class TurnDetector:
    """Probabilities → speech start/end events with hysteresis.

    Speech starts after ``start_ms`` of windows above ``threshold`` (a cough or a click is
    shorter); it ends after ``end_ms`` of windows below ``threshold - 0.15``. Pure logic,
    so the timing rules are tested without audio.
    """

    def __init__(self, threshold: float = 0.5, start_ms: float = 96.0, end_ms: float = 600.0):
        self.threshold = threshold
        self.low = max(0.0, threshold - 0.15)
        self.start_windows = max(1, round(start_ms / 1000 / WINDOW_S))
        self.end_windows = max(1, round(end_ms / 1000 / WINDOW_S))
        self.speaking = False
        self._run = 0
        self.t = 0.0

    def reset(self) -> None:
        self.speaking, self._run = False, 0

    def push(self, probs: list[float]) -> list[TurnEvent]:
        events = []
        for p in probs:
            self.t += WINDOW_S
            if not self.speaking:
                self._run = self._run + 1 if p >= self.threshold else 0
                if self._run >= self.start_windows:
                    self.speaking, self._run = True, 0
                    events.append(TurnEvent("start", self.t))
            else:
                self._run = self._run + 1 if p < self.low else 0
                if self._run >= self.end_windows:
                    self.speaking, self._run = False, 0
                    events.append(TurnEvent("end", self.t))
        return events
