"""Diarising a stream as it decodes (the scrape), a whole file or a waveform."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from voxtral.audio import StreamResampler
from voxtral.diarize.channels import channel_activity, channel_turns, is_channel_split
from voxtral.diarize.turns import Diarization, DiarizeError, Turn, name_speakers
from voxtral.diarize.voices import (
    ENCODER_RATE,
    FRAME,
    MEL_HOP,
    cluster,
    embed,
    frame_labels,
    level_gain,
    mark_handover_overlap,
    mel_frames,
    turns_from_labels,
    voice_encoder,
)
from voxtral.vad import FRAME_S, hysteresis, off_threshold

if TYPE_CHECKING:
    from voxtral.config.sections import DiarizeConfig

# -- streaming -----------------------------------------------------------------------------


class StreamingDiarizer:
    """Diarises one stream: :meth:`push_audio` the decoded blocks (``[n]`` mono or ``[2, n]``
    stereo at ``source_rate``), :meth:`push_vad` the VAD's frame probabilities, then
    :meth:`finish`. Holds at most the audio the VAD has not judged yet."""

    def __init__(
        self, cfg: DiarizeConfig, source_rate: int, vad_threshold: float = 0.5, encoder=None
    ):
        if cfg.method != "resemblyzer":
            raise DiarizeError(
                f"diarize.method={cfg.method} does not stream: use diarize_file (pyannote)"
            )
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else voice_encoder(cfg.device)
        self.on, self.off = vad_threshold, off_threshold(vad_threshold)
        self.rate = source_rate
        self.to16 = StreamResampler(source_rate, ENCODER_RATE)
        self.win = max(MEL_HOP, round(cfg.window_s * ENCODER_RATE / MEL_HOP) * MEL_HOP)
        self.hop = max(MEL_HOP, round(cfg.hop_s * ENCODER_RATE / MEL_HOP) * MEL_HOP)
        self._audio = np.zeros(0, np.float32)  # 16 kHz samples from ``_audio_at`` on
        self._audio_at = 0
        self._speech: list[np.ndarray] = []
        self._vad_state = False
        self.speech_frames = 0
        self._next = 0  # the next window's first sample (16 kHz)
        self._emb: list[np.ndarray] = []
        self._starts: list[int] = []  # window starts, in samples at 16 kHz
        self.stereo = False
        self._src_frame = source_rate * FRAME_S
        self._pending = np.zeros((2, 0), np.float32)
        self._consumed = self._stat_frames = 0
        self._energy: list[np.ndarray] = []
        self._cross: list[np.ndarray] = []
        self.samples = 0

    # -- input
    def push_audio(self, block: np.ndarray) -> None:
        block = np.asarray(block, np.float32)
        if block.ndim == 2:
            if block.shape[0] == 2:
                self.stereo = True
                self._channel_stats(block)
            mono = block.mean(axis=0)
        else:
            mono = block
        self.samples += len(mono)
        x = self.to16.push(mono)
        if len(x):
            self._audio = np.concatenate([self._audio, x])
        self._embed_ready()

    def push_vad(self, probs: np.ndarray) -> None:
        if len(probs):
            sp = hysteresis(np.asarray(probs, np.float32), self.on, self.off, self._vad_state)
            self._vad_state = bool(sp[-1])
            self._speech.append(sp)
            self.speech_frames += int(sp.sum())
            self._embed_ready()

    def _channel_stats(self, block: np.ndarray) -> None:
        """Per-VAD-frame energy of each channel and their cross product (three floats per
        32 ms: a whole video's fit in memory). Frame ``k`` spans source samples
        ``[round(k F), round((k + 1) F))``, ``F`` the frame length at the source rate."""
        buf = np.concatenate([self._pending, block], axis=1)
        f, base, k0 = self._src_frame, self._consumed, self._stat_frames
        last = int((base + buf.shape[1]) / f) + 1
        edges = np.round(np.arange(k0, last + 1) * f).astype(np.int64) - base
        edges = edges[edges <= buf.shape[1]]
        if len(edges) < 2:
            self._pending = buf
            return
        sq = np.cumsum(np.square(buf, dtype=np.float64), axis=1)
        cx = np.cumsum(buf[0].astype(np.float64) * buf[1])
        sq = np.concatenate([np.zeros((2, 1)), sq], axis=1)
        cx = np.concatenate([[0.0], cx])
        self._energy.append((sq[:, edges[1:]] - sq[:, edges[:-1]]).T)
        self._cross.append(cx[edges[1:]] - cx[edges[:-1]])
        self._stat_frames += len(edges) - 1
        self._consumed = base + int(edges[-1])
        self._pending = buf[:, int(edges[-1]) :]

    # -- windows
    def _speech_flags(self) -> np.ndarray:
        if len(self._speech) > 1:
            self._speech = [np.concatenate(self._speech)]
        return self._speech[0] if self._speech else np.zeros(0, bool)

    def _embed_ready(self, final: bool = False) -> None:
        speech = self._speech_flags()
        judged = len(speech) * FRAME  # 16 kHz samples the VAD has judged
        have = self._audio_at + len(self._audio)
        limit = min(judged, have) if not final else have
        starts, mels = [], []
        seg_lo = self._next
        while self._next + self.win <= limit:
            a = self._next
            flags = speech[a // FRAME : -(-(a + self.win) // FRAME)]
            if flags.size and flags.mean() >= self.cfg.min_window_speech:
                starts.append(a)
            self._next += self.hop
        if final and not starts and not self._starts and have - self._next >= ENCODER_RATE // 2:
            # a stream shorter than one window: one window of what there is
            flags = speech[self._next // FRAME : -(-have // FRAME)]
            if flags.size and flags.mean() >= self.cfg.min_window_speech:
                self._embed_short(self._next, have)
        if starts:
            seg = self._audio[seg_lo - self._audio_at : starts[-1] + self.win - self._audio_at]
            mel = mel_frames(seg)
            per = self.win // MEL_HOP
            for a in starts:
                i = (a - seg_lo) // MEL_HOP
                w = self._audio[a - self._audio_at : a + self.win - self._audio_at]
                m = mel[i : i + per]
                if len(m) < per:
                    m = np.pad(m, ((0, per - len(m)), (0, 0)))
                mels.append(m * level_gain(w))
            # float16: 512 bytes a window, 7 MB per hour of speech at a 0.25 s hop
            self._emb.append(embed(self.encoder, np.stack(mels), self.cfg.batch).astype(np.float16))
            self._starts.extend(starts)
        drop = min(self._next, limit) - self._audio_at
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_at += drop

    def _embed_short(self, a: int, b: int) -> None:
        w = self._audio[a - self._audio_at : b - self._audio_at]
        self._emb.append(
            embed(self.encoder, (mel_frames(w) * level_gain(w))[None]).astype(np.float16)
        )
        self._starts.append(a)

    # -- result
    def finish(self) -> Diarization:
        """The turns of the whole stream (flushes the resampler and the last windows)."""
        tail = self.to16.flush()
        if len(tail):
            self._audio = np.concatenate([self._audio, tail])
        self._embed_ready(final=True)
        speech = self._speech_flags()
        audio_s = self.samples / self.rate if self.rate else 0.0
        n = len(speech)
        base = {"speech_s": float(speech.sum() * FRAME_S)}
        if self.stereo and self.cfg.channel_split and self._energy:
            energy, cross = np.concatenate(self._energy), np.concatenate(self._cross)
            split, figures = is_channel_split(energy, cross, speech)
            base |= {f"channel_{k}": v for k, v in figures.items()}
            if split:
                active = channel_activity(energy, speech)
                turns = channel_turns(active, self.cfg.bridge_s)
                return Diarization(turns, "channels", len({t.speaker for t in turns}), audio_s,
                                   0, base)  # fmt: skip
        if not speech.any():
            return Diarization([], "none", 0, audio_s, 0, base)
        emb = np.concatenate(self._emb).astype(np.float32) if self._emb else np.zeros((0, 256))
        if not len(emb):  # speech, but too little for a window: one speaker
            labels_f = np.zeros(n, int)
            k = 1
        else:
            labels = cluster(
                emb, self.cfg.threshold, self.cfg.max_speakers, self.cfg.min_speaker_share
            )
            k = int(labels.max()) + 1
            starts = np.asarray(self._starts) // FRAME
            labels_f = frame_labels(starts, labels, -(-self.win // FRAME), n, k)
        runs = turns_from_labels(speech, labels_f, self.cfg.bridge_s, self.cfg.min_turn_s)
        spans = mark_handover_overlap(runs, self.cfg.overlap_s if k > 1 else 0.0)
        turns = name_speakers(spans)
        return Diarization(turns, "embeddings", len({t.speaker for t in turns}), audio_s,
                           len(emb), base)  # fmt: skip


# -- whole files and scoring ----------------------------------------------------------------


def diarize_file(
    path: str, cfg: DiarizeConfig, vad_threshold: float = 0.5, vad_rate: int = 16000
) -> Diarization:
    """Diarise a media file as the scrape does (stream-decoded in bounded memory, silero
    VAD), e.g. for benchmarks; ``diarize.method=pyannote`` runs pyannote.audio's pipeline
    on it instead."""
    if cfg.method == "pyannote":
        return _pyannote_file(path, cfg)
    from voxtral.media import decode_stream

    blocks = decode_stream(path, ENCODER_RATE, stereo=cfg.channel_split)
    return _diarize_blocks(blocks, ENCODER_RATE, cfg, vad_threshold, vad_rate)


def diarize_waveform(
    wav: np.ndarray, sr: int, cfg: DiarizeConfig, vad_threshold: float = 0.5
) -> Diarization:
    """Diarise audio already in memory: ``[T]`` mono or ``[2, T]`` stereo float at ``sr``
    (the resemblyzer method only)."""
    wav = np.asarray(wav, np.float32)
    step = 5 * sr
    blocks = (wav[..., i : i + step] for i in range(0, wav.shape[-1], step))
    return _diarize_blocks(blocks, sr, cfg, vad_threshold, 16000)


def _diarize_blocks(
    blocks: Iterable[np.ndarray], rate: int, cfg: DiarizeConfig, vad_threshold: float, vad_rate: int
) -> Diarization:
    from voxtral.vad import BatchedVAD

    d = StreamingDiarizer(cfg, rate, vad_threshold)
    vad = BatchedVAD(vad_rate)
    to_vad = StreamResampler(rate, vad_rate)
    for block in blocks:
        if not block.shape[-1]:
            continue
        d.push_audio(block)
        d.push_vad(vad.push(to_vad.push(block.mean(0) if block.ndim == 2 else block)))
    d.push_vad(np.concatenate([vad.push(to_vad.flush()), vad.flush()]))
    return d.finish()


def _pyannote_file(path: str, cfg: DiarizeConfig) -> Diarization:
    """pyannote.audio's pretrained pipeline (hub weights: a token in ``HF_TOKEN``)."""
    try:
        from pyannote.audio import Pipeline
    except ImportError as exc:
        raise DiarizeError(
            "diarize.method=pyannote needs pyannote.audio (`uv pip install pyannote.audio`) "
            "and access to its hub weights; the default method is resemblyzer"
        ) from exc
    import os

    pipe = Pipeline.from_pretrained(cfg.pyannote_model, use_auth_token=os.environ.get("HF_TOKEN"))
    pipe.to(torch.device(cfg.device))
    ann = pipe(path, max_speakers=cfg.max_speakers)
    spans = [(s.start, s.end, spk) for s, _, spk in ann.itertracks(yield_label=True)]
    ids = {k: i for i, k in enumerate(dict.fromkeys(k for _, _, k in sorted(spans)))}
    raw = [Turn(a, b, str(ids[k])) for a, b, k in spans]
    marked = [(t.start_s, t.end_s, ids[k], _overlaps(t, raw))
              for t, (_, _, k) in zip(raw, spans, strict=True)]  # fmt: skip
    turns = name_speakers(marked)
    end = max((t.end_s for t in turns), default=0.0)
    return Diarization(turns, "pyannote", len(ids), end)


def _overlaps(t: Turn, turns: list[Turn]) -> bool:
    return any(u is not t and u.speaker != t.speaker and u.start_s < t.end_s and t.start_s < u.end_s
               for u in turns)  # fmt: skip
