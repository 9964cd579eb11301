"""Voice activity: silero-vad (ONNX), speech probabilities per frame, and the threshold rule.

The one home for VAD: the scrape cuts chunks at pauses with it (``voxtral.chunking``), the
server takes turns with it (``serve_app.vad``). Both run the model the same way over a
stream (a frame of samples after ``context`` samples of the audio before it, the recurrent
state carried along) but want opposite things from it, hence two drivers:

- ``LiveVAD`` (serving): each frame's probability as soon as its samples arrive, one model
  call per frame, the state carried across every frame exactly as silero's own
  ``audio_forward`` does, so the result does not depend on how the stream is split.
- ``BatchedVAD`` (files): throughput. The stock model is called once per 32 ms frame, so
  the Python call overhead, not the network, dominates. Here a window of audio is split
  into segments that run side by side as one batch (one ONNX call advances every segment
  by a frame), each segment primed with a short warm-up from the audio just before it.
  Segments that are digital silence skip the model entirely.

Speech is then decided with hysteresis (``hysteresis``, ``off_threshold``): a frame turns
speech at ``p >= threshold`` and stays so until ``p < threshold - 0.15``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np
import onnxruntime as ort

from voxtral.audio import StreamResampler

FRAME_S = 0.032
"""One silero-vad frame: 256 samples at 8 kHz, 512 at 16 kHz."""
VAD_RATES = {8000: (256, 32), 16000: (512, 64)}  # rate → (frame samples, context samples)
HYSTERESIS = 0.15
"""How far below the on-threshold a probability must fall to end speech (silero's rule)."""
SILENCE_FLOOR = 10 ** (-60 / 20)
"""Segments whose peak is below -60 dBFS are silence without asking the model."""
_STATE_SHAPE = (2, 128)  # silero's recurrent state is [2, batch, 128]


@lru_cache(maxsize=1)
def silero_session() -> ort.InferenceSession:
    """The packaged silero-vad model, loaded once per process and shared by every stream
    (``run`` is thread-safe): a stream then costs its state, not a model load. One thread
    per call, on the CPU, as silero's own loader does: calls are tiny, threads cost more."""
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    path = str(files("silero_vad.data").joinpath("silero_vad.onnx"))
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _frame_sizes(rate: int) -> tuple[int, int]:
    if rate not in VAD_RATES:
        raise ValueError(f"silero-vad runs at 8000 or 16000 Hz, not {rate}")
    return VAD_RATES[rate]


def _step(
    session: ort.InferenceSession, x: np.ndarray, state: np.ndarray, sr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One model call: ``x`` is ``[batch, context + frame]``; returns (probabilities
    ``[batch]``, the next state)."""
    p, state = session.run(None, {"input": x, "state": state, "sr": sr})
    return p[:, 0], state


# -- the threshold rule -------------------------------------------------------------------


def off_threshold(on: float) -> float:
    """The probability under which speech ends, for speech that starts at ``on``."""
    return max(0.0, on - HYSTERESIS)


def hysteresis(probs: np.ndarray, on: float, off: float, state: bool = False) -> np.ndarray:
    """Speech flags: a frame turns speech at ``p >= on`` and stays so until ``p < off``;
    ``state`` is whether the frame before ``probs[0]`` was speech (for streaming)."""
    mark = np.where(probs >= on, 1, np.where(probs < off, 0, -1))
    idx = np.where(mark >= 0, np.arange(len(mark)), -1)
    idx = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(idx >= 0, mark[np.maximum(idx, 0)] == 1, state)


# -- drivers ------------------------------------------------------------------------------


class LiveVAD:
    """Speech probability of every ``FRAME_S`` frame of a live stream at ``source_rate``,
    resampled to ``rate`` (8 or 16 kHz) as it arrives."""

    def __init__(self, source_rate: int, rate: int = 16000):
        self.frame, self.ctx = _frame_sizes(rate)
        self.session = silero_session()
        self._resample = StreamResampler(source_rate, rate)
        self._sr = np.array(rate, dtype=np.int64)
        self._buf = np.zeros(0, np.float32)
        self._context = np.zeros((1, self.ctx), np.float32)
        self._state = np.zeros((_STATE_SHAPE[0], 1, _STATE_SHAPE[1]), np.float32)

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed samples; return the probabilities of the frames they complete."""
        buf = np.concatenate([self._buf, self._resample.push(x)])
        n = len(buf) // self.frame
        probs = np.empty(n, np.float32)
        for k in range(n):
            frame = buf[None, k * self.frame : (k + 1) * self.frame]
            x_in = np.concatenate([self._context, frame], axis=1)
            p, self._state = _step(self.session, x_in, self._state, self._sr)
            self._context = x_in[:, -self.ctx :]
            probs[k] = p[0]
        self._buf = buf[n * self.frame :]
        return probs


class BatchedVAD:
    """Speech probability per ``FRAME_S`` frame of a stream at ``rate`` (8 or 16 kHz), a
    window of ``batch`` segments of ``segment_frames`` frames at a time (see the module)."""

    def __init__(
        self,
        rate: int = 8000,
        segment_frames: int = 256,
        batch: int = 32,
        warmup_frames: int = 8,
    ):
        self.frame, self.ctx = _frame_sizes(rate)
        self.rate = rate
        self.seg = segment_frames
        self.batch = batch
        self.warm = warmup_frames
        self.session = silero_session()
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
            state = np.zeros((_STATE_SHAPE[0], len(live), _STATE_SHAPE[1]), np.float32)
            out = np.empty((steps, len(live)), np.float32)
            for t in range(steps):
                out[t], state = _step(self.session, inputs[t], state, self._sr)
            self.model_frames += steps * len(live)
            probs.reshape(n_seg, seg)[live] = out[warm:].T
        return probs[:n]
