"""By channel: a stereo source whose two channels carry different speakers, split exactly."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from voxtral.diarize.turns import Turn, join_runs, label_runs, name_speakers
from voxtral.vad import FRAME_S

if TYPE_CHECKING:
    pass

CHANNEL_DOMINANCE_DB = 10.0
CHANNEL_BLEED_DB = 20.0


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
        for a, b, _ in join_runs(
            [r for r in label_runs(active[:, c].astype(int)) if r[2] == 1], bridge
        ):
            spans.append((a, b, c, bool(both[a:b].any())))
    return name_speakers([(a * FRAME_S, b * FRAME_S, c, o) for a, b, c, o in spans])
