"""Turns: who speaks from when to when, naming, clipping to a chunk, and scoring (RTTM, DER)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass


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


def label_runs(lab: np.ndarray) -> list[tuple[int, int, int]]:
    if not len(lab):
        return []
    edges = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(lab)]])
    return [(int(a), int(b), int(lab[a])) for a, b in zip(starts, ends, strict=True)]


def join_runs(runs: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for a, b, k in runs:
        if out and out[-1][2] == k and a - out[-1][1] <= gap:
            out[-1] = (out[-1][0], b, k)
        else:
            out.append((a, b, k))
    return out
