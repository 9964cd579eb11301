"""Diarisation: who speaks when in one video, with speaker ids consistent across its chunks.

Two ways, decided per source once its audio has been seen (:func:`is_channel_split`):

- **By channel** (exact): a stereo source whose channels carry different speakers (a
  two-track call or podcast recording) needs no model. Speaker ``k`` speaks in a speech
  frame when its channel is loud there (:func:`channel_activity`); both loud is overlap.
- **By voice** (a pretrained speaker encoder, then clustering): resemblyzer's
  ``VoiceEncoder`` (its weights ship inside the wheel: offline, CPU) embeds sliding windows
  of speech; agglomerative clustering on cosine distance with a threshold finds the
  speakers (:func:`cluster`); the windows' labels vote per frame (:func:`frame_labels`),
  and the frames become turns (:func:`turns_from_labels`).

Why agglomerative clustering with a distance rule rather than spectral clustering with an
eigengap: the rule says "one speaker" as readily as "three", where an eigengap needs at
least two clusters to exist, and one-speaker videos (lectures, monologues) are common.
Measured on the sample corpus, a plain cosine threshold on the raw embeddings could not
separate its closest pair of voices (same-voice and other-voice window distances overlap),
so the tree is built on embeddings centred on the video's mean, and the speaker count is
decided on the distance between speaker centroids (:func:`cluster`), which averages the
per-window noise away. ``diarize.max_speakers`` caps the count.

Streaming: the caller feeds decoded blocks and the VAD's per-frame probabilities as they
come (``voxtral.vad``: the scrape's own silero decisions are reused, no second VAD).
Audio waits only until the VAD has judged it, then its windows are embedded (256 floats
per window) and the samples dropped; the clustering runs at the end over the embeddings.
So memory is bounded by the VAD's look-ahead whatever the video's length.

Overlap on a mono mix is a heuristic: where one speaker's turn runs into the other's
without a pause, both are taken to speak for ``diarize.overlap_s`` on each side of the
change (people rarely hand over in exactly no time; a hand-over without a pause is mostly
one voice starting over the other's last syllables). A backchannel spoken over a long turn
is not found. By channel, overlap is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from voxtral.audio import StreamResampler
from voxtral.vad import FRAME_S, hysteresis, off_threshold

if TYPE_CHECKING:
    from voxtral.config.sections import DiarizeConfig

ENCODER_RATE = 16000
"""resemblyzer's rate: 16 kHz, 40 mel bands, 25 ms windows every 10 ms."""
MEL_HOP = 160
FRAME = round(FRAME_S * ENCODER_RATE)  # one VAD frame at the encoder rate (512 samples)
TARGET_DBFS = -30.0
"""Loudness each window is brought to before its (power) mel spectrogram, as resemblyzer
does to a whole utterance: the embedding then hears the voice, not the level."""
MAX_CLUSTER_POINTS = 2000
"""Windows the clustering tree is built on (about 8 minutes of speech at a 0.25 s hop)."""
CHANNEL_DOMINANCE_DB = 10.0
CHANNEL_BLEED_DB = 20.0


class DiarizeError(RuntimeError):
    """Diarisation cannot run (its model is missing, a method is not installed)."""


@dataclass(frozen=True)
class Turn:
    """A span of one speaker; ``overlap``: another speaker talks during (part of) it."""

    start_s: float
    end_s: float
    speaker: str
    overlap: bool = False


@dataclass
class Diarization:
    """One video's turns and how they were found."""

    turns: list[Turn]
    method: str  # "channels" | "embeddings" | "none" (no speech)
    speakers: int
    audio_s: float
    windows: int = 0
    stats: dict = field(default_factory=dict)

    def overlap_s(self) -> float:
        """Seconds during which at least two speakers talk."""
        return _overlap_seconds(self.turns)


# -- the encoder ---------------------------------------------------------------------------


@lru_cache(maxsize=2)
def voice_encoder(device: str = "cpu"):
    """resemblyzer's pretrained ``VoiceEncoder`` (the weights inside its wheel), once per
    process and device."""
    try:
        from resemblyzer import VoiceEncoder
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise DiarizeError(f"resemblyzer is not installed: {exc}") from exc
    enc = VoiceEncoder(device=device, verbose=False)
    enc.eval()
    return enc


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """``[T]`` float32 at 16 kHz → ``[frames, 40]`` power mel frames, every 10 ms (the
    encoder's own front end)."""
    from resemblyzer import wav_to_mel_spectrogram

    return wav_to_mel_spectrogram(np.asarray(wav, np.float32))


def level_gain(wav: np.ndarray) -> float:
    """The power gain that brings ``wav`` to ``TARGET_DBFS`` (mels are power: gain²)."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if len(wav) else 0.0
    if rms < 1e-5:
        return 1.0
    return float(10 ** ((TARGET_DBFS - 20 * math.log10(rms)) / 10))


def embed(encoder, mels: np.ndarray, batch: int = 64) -> np.ndarray:
    """``[n, frames, 40]`` mel windows → ``[n, 256]`` L2-normalised embeddings."""
    out = []
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(mels), batch):
            x = torch.from_numpy(np.ascontiguousarray(mels[i : i + batch])).to(device)
            out.append(encoder(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 256), np.float32)


# -- the math (pure) -----------------------------------------------------------------------


def cluster(
    emb: np.ndarray,
    threshold: float,
    max_speakers: int,
    min_share: float = 0.1,
    max_points: int = MAX_CLUSTER_POINTS,
) -> np.ndarray:
    """Speaker label per embedding, labels numbered by first appearance.

    The embeddings are centred on the video's mean first (what all its windows share: the
    room, the microphone, the language) so that what is left tells the voices apart; an
    average-linkage tree on cosine distance then proposes 2, 3… clusters, and the largest
    count whose every pair of speaker centroids (in the raw embedding space) is at least
    ``threshold`` apart and whose every speaker holds at least ``min_share`` of the windows
    wins, at most ``max_speakers`` (1 when no split passes). The share rule is there because
    a few odd windows of one voice (a laugh, a mixed window) make a small cluster whose
    centroid, averaged over few windows, lands far from everything: measured on the sample
    corpus, such sub-splits of one voice reach the same centroid distance as its closest
    pair of real voices.
    Past ``max_points`` windows the tree is built on an even subsample and every window
    joins its nearest centroid (the tree's memory grows with the square of its points).
    """
    n = len(emb)
    if n < 4 or max_speakers < 2:
        return np.zeros(n, int)
    from scipy.cluster.hierarchy import fcluster, linkage

    x = emb - emb.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
    pick = np.linspace(0, n - 1, min(n, max_points)).round().astype(int)
    tree = linkage(x[pick], method="average", metric="cosine")
    best = np.zeros(n, int)
    for k in range(2, max_speakers + 1):
        sub = fcluster(tree, k, criterion="maxclust") - 1
        if sub.max() + 1 < k:
            break
        cent = np.stack([x[pick][sub == j].mean(0) for j in range(k)])
        labels = np.argmax(x @ cent.T, axis=1) if len(pick) < n else sub
        if np.bincount(labels, minlength=k).min() < max(2, min_share * n):
            break
        if _min_centroid_distance(emb, labels) < threshold:
            break
        best = labels
    return _by_first_appearance(best)


def _min_centroid_distance(emb: np.ndarray, labels: np.ndarray) -> float:
    ks = np.unique(labels)
    cent = np.stack([emb[labels == k].mean(0) for k in ks])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-9
    dist = 1 - cent @ cent.T
    return float(dist[np.triu_indices(len(ks), 1)].min())


def _by_first_appearance(labels: np.ndarray) -> np.ndarray:
    order = {int(k): i for i, k in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[int(k)] for k in labels], int)


def frame_labels(
    starts: np.ndarray, labels: np.ndarray, window: int, n_frames: int, n_speakers: int
) -> np.ndarray:
    """Speaker per frame (``-1`` where no window says anything): the majority of the
    windows covering the frame (window ``i`` covers frames ``[starts[i], starts[i] +
    window)``); a frame no window covers takes the nearest window's label."""
    out = np.full(n_frames, -1, int)
    if not len(starts) or n_frames == 0:
        return out
    votes = np.zeros((n_frames + 1, n_speakers), np.float32)
    ends = np.minimum(starts + window, n_frames)
    np.add.at(votes, (np.minimum(starts, n_frames), labels), 1.0)
    np.add.at(votes, (ends, labels), -1.0)
    votes = np.cumsum(votes, axis=0)[:n_frames]
    covered = votes.sum(1) > 0.5
    out[covered] = np.argmax(votes[covered], axis=1)
    if not covered.all():
        centers = starts + window // 2
        idx = np.flatnonzero(~covered)
        pos = np.clip(np.searchsorted(centers, idx), 1, len(centers) - 1) if len(centers) > 1 else 0
        if len(centers) > 1:
            left = np.abs(idx - centers[pos - 1]) <= np.abs(centers[pos] - idx)
            out[idx] = np.where(left, labels[pos - 1], labels[pos])
        else:
            out[idx] = labels[0]
    return out


def turns_from_labels(
    speech: np.ndarray, labels: np.ndarray, bridge_s: float, min_turn_s: float
) -> list[tuple[int, int, int]]:
    """``(start frame, end frame, label)`` runs of speech frames, a pause shorter than
    ``bridge_s`` inside one speaker's run bridged, and runs shorter than ``min_turn_s``
    inside continuous speech given to the longer neighbour (a label flicker, not a turn)."""
    lab = np.where(speech, labels, -1)
    runs = _runs(lab)
    runs = [r for r in runs if r[2] >= 0]
    bridge, min_turn = round(bridge_s / FRAME_S), round(min_turn_s / FRAME_S)
    changed = True
    while changed and len(runs) > 1:
        changed = False
        for i, (a, b, k) in enumerate(runs):
            if b - a >= min_turn:
                continue
            prev = runs[i - 1] if i > 0 and runs[i - 1][1] == a else None
            nxt = runs[i + 1] if i + 1 < len(runs) and runs[i + 1][0] == b else None
            pick = max((r for r in (prev, nxt) if r), key=lambda r: r[1] - r[0], default=None)
            if pick is not None and pick[2] != k:
                runs[i] = (a, b, pick[2])
                runs = _join(runs, 0)
                changed = True
                break
    return _join(runs, bridge)


def _runs(lab: np.ndarray) -> list[tuple[int, int, int]]:
    if not len(lab):
        return []
    edges = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(lab)]])
    return [(int(a), int(b), int(lab[a])) for a, b in zip(starts, ends, strict=True)]


def _join(runs: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for a, b, k in runs:
        if out and out[-1][2] == k and a - out[-1][1] <= gap:
            out[-1] = (out[-1][0], b, k)
        else:
            out.append((a, b, k))
    return out


def mark_handover_overlap(
    runs: list[tuple[int, int, int]], overlap_s: float
) -> list[tuple[float, float, int, bool]]:
    """Runs → ``(start_s, end_s, label, overlap)``: where one speaker's run ends exactly
    where another's begins (no pause), both extend ``overlap_s`` into each other and the
    shared span is marked overlap (see the module docstring)."""
    out = [[a * FRAME_S, b * FRAME_S, k, False] for a, b, k in runs]
    for i in range(len(runs) - 1):
        (a0, b0, k0), (a1, b1, k1) = runs[i], runs[i + 1]
        if k0 != k1 and b0 == a1 and overlap_s > 0:
            ext = min(overlap_s, (b1 - a1) * FRAME_S / 2, (b0 - a0) * FRAME_S / 2)
            out[i][1] += ext
            out[i + 1][0] -= ext
            out[i][3] = out[i + 1][3] = True
    return [(a, b, k, o) for a, b, k, o in out]


def is_channel_split(
    energy: np.ndarray, cross: np.ndarray, speech: np.ndarray, min_share: float = 0.1
) -> tuple[bool, dict]:
    """Whether a stereo source carries different speakers on its two channels.

    ``energy`` is ``[frames, 2]`` (sum of squares per channel), ``cross`` the per-frame
    sum of left × right. Over speech frames, a split source has (1) channels that hardly
    correlate (|r| < 0.5: one mix panned both ways correlates near 1), (2) one channel at
    least ``CHANNEL_DOMINANCE_DB`` louder than the other in most speech frames (>= 60 %),
    and (3) each channel the louder one in at least ``min_share`` of them (two speakers,
    not one voice and a noisy spare track). Returns the decision and its figures.
    """
    sp = speech[: len(energy)]
    e = energy[: len(sp)][sp]
    if len(e) < 10:
        return False, {"corr": 1.0, "dominant": 0.0, "left": 0.0, "right": 0.0}
    el, er = e[:, 0], e[:, 1]
    corr = float(abs(cross[: len(sp)][sp].sum()) / math.sqrt(el.sum() * er.sum() + 1e-20))
    db = 10 * np.log10((el + 1e-10) / (er + 1e-10))
    left = float((db >= CHANNEL_DOMINANCE_DB).mean())
    right = float((db <= -CHANNEL_DOMINANCE_DB).mean())
    figures = {"corr": corr, "dominant": left + right, "left": left, "right": right}
    split = corr < 0.5 and left + right >= 0.6 and min(left, right) >= min_share
    return split, figures


def channel_activity(energy: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """``[frames, 2]`` bool: channel ``c`` speaks in a speech frame when it is within
    ``CHANNEL_BLEED_DB`` of the louder channel (quieter than that is the other voice
    bleeding in) and within 30 dB of its own typical speech level."""
    n = min(len(energy), len(speech))
    db = 10 * np.log10(energy[:n] + 1e-10)
    sp = speech[:n]
    out = np.zeros((n, 2), bool)
    if not sp.any():
        return out
    top = db.max(axis=1, keepdims=True)
    typical = np.percentile(db[sp], 90, axis=0)
    out = (db >= top - CHANNEL_BLEED_DB) & (db >= typical - 30.0) & sp[:, None]
    return out


def channel_turns(active: np.ndarray, bridge_s: float) -> list[Turn]:
    """Per-channel activity → turns; a span where both channels speak is overlap."""
    both = active.all(axis=1)
    bridge = round(bridge_s / FRAME_S)
    spans = []
    for c in range(active.shape[1]):
        for a, b, _ in _join([r for r in _runs(active[:, c].astype(int)) if r[2] == 1], bridge):
            spans.append((a, b, c, bool(both[a:b].any())))
    return name_speakers([(a * FRAME_S, b * FRAME_S, c, o) for a, b, c, o in spans])


def name_speakers(spans: Iterable[tuple[float, float, int, bool]]) -> list[Turn]:
    """Spans with any labels → turns sorted by start, speakers ``S0``, ``S1``… in order of
    first appearance."""
    spans = sorted(spans, key=lambda s: (s[0], s[1]))
    names: dict[int, str] = {}
    out = []
    for a, b, k, o in spans:
        names.setdefault(k, f"S{len(names)}")
        out.append(Turn(round(a, 3), round(b, 3), names[k], o))
    return out


def _overlap_seconds(turns: list[Turn], step: float = 0.01) -> float:
    if not turns:
        return 0.0
    n = int(max(t.end_s for t in turns) / step) + 2
    count = np.zeros(n, np.int16)
    for t in turns:
        count[int(t.start_s / step) : int(t.end_s / step)] += 1
    return float((count > 1).sum() * step)


def turns_within(turns: list[Turn], start_s: float, end_s: float) -> list[dict]:
    """The turns overlapping ``[start_s, end_s)``, clipped to it and timed relative to
    ``start_s`` (the chunks' ``turns`` column)."""
    out = []
    for t in turns:
        a, b = max(t.start_s, start_s), min(t.end_s, end_s)
        if b > a:
            out.append({"start_s": round(a - start_s, 3), "end_s": round(b - start_s, 3),
                        "speaker": t.speaker, "overlap": t.overlap})  # fmt: skip
    return out


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


def read_rttm(path: str) -> list[Turn]:
    """Turns from an RTTM file (``SPEAKER <file> 1 <start> <dur> <NA> <NA> <who> ...``)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            p = line.split()
            if len(p) >= 8 and p[0] == "SPEAKER":
                a, d = float(p[3]), float(p[4])
                out.append(Turn(a, a + d, p[7]))
    return out


def der(reference: list[Turn], hypothesis: list[Turn], collar: float = 0.25) -> dict:
    """Diarisation error rate with ``pyannote.metrics`` (the standard implementation:
    optimal speaker mapping, overlap scored, ``collar`` seconds forgiven around each
    reference boundary): ``{der, missed, false_alarm, confusion, total}`` (seconds but der)."""
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    def ann(turns: list[Turn]) -> Annotation:
        a = Annotation()
        for i, t in enumerate(turns):
            if t.end_s > t.start_s:
                a[Segment(t.start_s, t.end_s), i] = t.speaker
        return a

    import warnings

    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    with warnings.catch_warnings():  # "uem approximated by the union of both extents": yes
        warnings.simplefilter("ignore", UserWarning)
        parts = metric(ann(reference), ann(hypothesis), detailed=True)
    return {
        "der": float(parts["diarization error rate"]),
        "missed": float(parts["missed detection"]),
        "false_alarm": float(parts["false alarm"]),
        "confusion": float(parts["confusion"]),
        "total": float(parts["total"]),
    }
