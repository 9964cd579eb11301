"""Turn-taking: when the user starts and stops speaking, from ``voxtral.vad`` probabilities.

The model and its per-frame probabilities live in ``voxtral.vad`` (one ``LiveVAD`` per
conversation, sharing one ONNX session); what is specific to serving is the timing rule
below, kept free of audio so it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from voxtral.vad import FRAME_S, off_threshold


@dataclass
class TurnEvent:
    kind: str  # "start" (the user began speaking) or "end" (the user has finished)
    at_s: float  # stream time (seconds of audio pushed) at which it was decided


class TurnDetector:
    """Probabilities → speech start/end events with hysteresis.

    Speech starts after ``start_ms`` of frames at or above ``threshold`` (a cough or a
    click is shorter); it ends after ``end_ms`` of frames below ``off_threshold(threshold)``.
    """

    def __init__(self, threshold: float = 0.5, start_ms: float = 96.0, end_ms: float = 600.0):
        self.threshold = threshold
        self.low = off_threshold(threshold)
        self.start_windows = max(1, round(start_ms / 1000 / FRAME_S))
        self.end_windows = max(1, round(end_ms / 1000 / FRAME_S))
        self.speaking = False
        self._run = 0
        self.t = 0.0

    def reset(self) -> None:
        self.speaking, self._run = False, 0

    def push(self, probs: Iterable[float]) -> list[TurnEvent]:
        events = []
        for p in probs:
            self.t += FRAME_S
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
