"""By voice: resemblyzer embeddings of speech windows, clustering, and frame labels to turns."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from voxtral.diarize.turns import DiarizeError, join_runs, label_runs
from voxtral.vad import FRAME_S

if TYPE_CHECKING:
    pass

ENCODER_RATE = 16000
"""resemblyzer's rate: 16 kHz, 40 mel bands, 25 ms windows every 10 ms."""
MEL_HOP = 160
FRAME = round(FRAME_S * ENCODER_RATE)  # one VAD frame at the encoder rate (512 samples)
TARGET_DBFS = -30.0
"""Loudness each window is brought to before its (power) mel spectrogram, as resemblyzer
does to a whole utterance: the embedding then hears the voice, not the level."""
MAX_CLUSTER_POINTS = 2000
"""Windows the clustering tree is built on (about 8 minutes of speech at a 0.25 s hop)."""
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
    runs = label_runs(lab)
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
                runs = join_runs(runs, 0)
                changed = True
                break
    return join_runs(runs, bridge)


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
