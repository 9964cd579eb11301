"""Incremental codec encoding and decoding for streams that arrive and leave in chunks.

Both codecs are causal but carry state (convolution receptive fields, an LSTM), so coding a
chunk on its own differs from coding it in place. Each call therefore codes the chunk with
some left context and keeps only the new part. On the way out, the few samples at a chunk
edge that the next call would compute differently are held back and crossfaded with their
recomputed version, so chunk boundaries do not click.
"""

from __future__ import annotations

import numpy as np
import torch

from voxtral.codec import Codec


def crossfade(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Linear crossfade from ``old`` to ``new`` (same length)."""
    n = len(old)
    if n == 0:
        return new
    w = (np.arange(n, dtype=np.float32) + 0.5) / n
    return old * (1.0 - w) + new * w


class CodecStreamEncoder:
    """24 kHz samples in any chunking → codes ``[n_q, F]`` of the whole frames so far."""

    def __init__(self, codec: Codec, context_frames: int = 12):
        self.codec = codec
        self.hop = round(codec.sample_rate / codec.frame_rate)
        self.context = context_frames * self.hop
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet encoded
        self._history = np.zeros(0, dtype=np.float32)  # already encoded, kept as context

    @property
    def pending_samples(self) -> int:
        return len(self._pending)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        return self._run(self.stage(pcm))

    def flush(self, multiple: int = 1, held: int = 0) -> np.ndarray:
        """Encode what is pending, padded with silence so that ``held`` frames the caller
        already has plus the new ones make a whole number of ``multiple`` frames."""
        return self._run(self.stage(None, flush=True, multiple=multiple, held=held))

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._history = np.zeros(0, dtype=np.float32)

    def stage(
        self, pcm: np.ndarray | None, flush: bool = False, multiple: int = 1, held: int = 0
    ) -> tuple[np.ndarray, int]:
        """Take new audio; return (window to encode: context + whole new frames, frames).
        Split from ``finish`` so that several streams can share one encoder call."""
        if pcm is not None:
            self._pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        if flush:
            frames = -(-len(self._pending) // self.hop)
            frames = -(-(held + frames) // multiple) * multiple - held
            pad = frames * self.hop - len(self._pending)
            self._pending = np.concatenate([self._pending, np.zeros(pad, dtype=np.float32)])
        else:
            frames = len(self._pending) // self.hop
        new = self._pending[: frames * self.hop]
        self._pending = self._pending[frames * self.hop :]
        return np.concatenate([self._history, new]), frames

    def finish(self, window: np.ndarray, frames: int, codes: np.ndarray) -> np.ndarray:
        """Codes of the staged ``window`` → the codes of its new frames."""
        if frames <= 0:
            return np.zeros((self.codec.n_q, 0), dtype=np.int64)
        self._history = window[-self.context :] if self.context else window[:0]
        return codes[:, -frames:].astype(np.int64)

    def _run(self, staged: tuple[np.ndarray, int]) -> np.ndarray:
        return encode_many([self], [staged])[0]


def encode_many(
    encoders: list[CodecStreamEncoder], staged: list[tuple[np.ndarray, int]]
) -> list[np.ndarray]:
    """``finish`` for several streams of one codec, batching windows of equal length into
    one encoder call (streams fed at the same pace stage windows of the same length)."""
    out: list[np.ndarray | None] = [None] * len(encoders)
    by_len: dict[int, list[int]] = {}
    for i, (enc, (window, frames)) in enumerate(zip(encoders, staged, strict=True)):
        if frames <= 0:
            out[i] = enc.finish(window, frames, np.zeros((enc.codec.n_q, 0), dtype=np.int64))
        else:
            by_len.setdefault(len(window), []).append(i)
    for idx in by_len.values():
        codec = encoders[idx[0]].codec
        batch = torch.from_numpy(np.stack([staged[i][0] for i in idx]))[:, None]
        codes = codec.encode(batch).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = encoders[i].finish(staged[i][0], staged[i][1], codes[j])
    return out  # type: ignore[return-value]


class CodecStreamDecoder:
    """Codes ``[n_q, F]`` in chunks → 24 kHz samples, click-free across chunk edges.

    ``holdback`` samples at the end of each chunk are released with the next chunk,
    crossfaded into the next call's recomputation of them; ``flush`` releases them at the
    end of a turn.
    """

    def __init__(self, codec: Codec, context_frames: int = 6, holdback: int = 240):
        self.codec = codec
        self.hop = round(codec.sample_rate / codec.frame_rate)
        self.context_frames = context_frames
        self.holdback = holdback
        self._context = np.zeros((codec.n_q, 0), dtype=np.int64)
        self._held = np.zeros(0, dtype=np.float32)

    def push(self, codes: np.ndarray) -> np.ndarray:
        window = self.window(codes)
        if window.shape[1] == self._context.shape[1]:
            return np.zeros(0, dtype=np.float32)
        wav = self.codec.decode(torch.from_numpy(window)[None])[0, 0].float().cpu().numpy()
        return self.finish(window, wav)

    def window(self, codes: np.ndarray) -> np.ndarray:
        """The codes to decode for ``codes``: left context + the new frames."""
        return np.concatenate([self._context, np.asarray(codes, dtype=np.int64)], axis=1)

    def finish(self, window: np.ndarray, wav: np.ndarray) -> np.ndarray:
        """Decoded ``window`` → the samples to play now (see ``push``)."""
        f = window.shape[1] - self._context.shape[1]
        new = wav[len(wav) - f * self.hop :]
        k = min(len(self._held), len(wav) - len(new))
        head = self._held[:-k] if k else self._held
        redo = wav[len(wav) - len(new) - k : len(wav) - len(new)]
        out = [head, crossfade(self._held[len(self._held) - k :], redo)] if k else [head]
        h = min(self.holdback, len(new))
        out.append(new[: len(new) - h])
        self._held = new[len(new) - h :].copy()
        self._context = window[:, -self.context_frames :] if self.context_frames else window[:, :0]
        return np.concatenate(out).astype(np.float32)

    def flush(self) -> np.ndarray:
        out, self._held = self._held, np.zeros(0, dtype=np.float32)
        return out

    def reset(self) -> None:
        self._context = np.zeros((self.codec.n_q, 0), dtype=np.int64)
        self._held = np.zeros(0, dtype=np.float32)


def decode_many(decoders: list[CodecStreamDecoder], codes: list[np.ndarray]) -> list[np.ndarray]:
    """``push`` for several streams of one codec, batching those whose windows have the same
    length into one decoder call (after a turn's first chunk, that is all of them)."""
    out: list[np.ndarray | None] = [None] * len(decoders)
    windows = [d.window(c) for d, c in zip(decoders, codes, strict=True)]
    by_len: dict[int, list[int]] = {}
    for i, (d, w) in enumerate(zip(decoders, windows, strict=True)):
        if w.shape[1] == d._context.shape[1]:
            out[i] = np.zeros(0, dtype=np.float32)
        else:
            by_len.setdefault(w.shape[1], []).append(i)
    if not decoders:
        return []
    codec = decoders[0].codec
    for idx in by_len.values():
        batch = torch.from_numpy(np.stack([windows[i] for i in idx]))
        wavs = codec.decode(batch)[:, 0].float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = decoders[i].finish(windows[i], wavs[j])
    return out  # type: ignore[return-value]
