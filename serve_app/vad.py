"""Turn-taking: when the user starts and stops speaking, from ``voxtral.vad`` probabilities,
and when the model's own output has gone quiet (half duplex: that ends the model's turn).

The model and its per-frame probabilities live in ``voxtral.vad`` (one ``LiveVAD`` per
stream, sharing one ONNX session); what is specific to serving is the timing rule
(``TurnDetector``), kept free of audio so it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from voxtral.vad import FRAME_S, LiveVAD, off_threshold


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


class OutputEnd:
    """Whether the model's turn is over (half duplex): its output spoke, then stayed quiet
    for ``silence_ms``. Counted in output audio, not wall time, since generation runs ahead
    of real time. Output that never speaks never ends here (``max_turn_s`` caps it).

    One per session, ``reset`` at each turn; ``push`` runs silero, so call it off the event
    loop (the session's audio pool)."""

    def __init__(self, rate: int, threshold: float, silence_ms: float, start_ms: float = 96.0):
        self.rate, self.threshold = rate, threshold
        self.silence_ms, self.start_ms = silence_ms, start_ms
        self.reset()

    def reset(self) -> None:
        """Forget the last turn: a fresh VAD stream (cheap: the model itself is shared)."""
        self.vad = LiveVAD(self.rate)
        self.turn = TurnDetector(self.threshold, self.start_ms, self.silence_ms)

    def push(self, pcm: np.ndarray) -> bool:
        """More of the turn's output; whether the turn is now over."""
        return any(ev.kind == "end" for ev in self.turn.push(self.vad.push(pcm)))
