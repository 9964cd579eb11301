"""Turn-taking scores in the manner of Full-Duplex-Bench v1, from speech segments alone.

Full-Duplex-Bench (FDB, Lin et al. 2025, arXiv:2503.04721) plays a recorded user to a
model in real time, records the model's time-aligned output, transcribes it with word
times and scores four behaviours. This module keeps its definitions where they exist,
with a VAD in place of the ASR, so no external model or judge is needed:

- **Takeover** (FDB's turn-over rate, TOR, per event). FDB: the model takes the floor
  when its output spans at least 1 s (first word's start to last word's end) or has more
  than 3 words. Here, VAD-only: the model's speech in the event's window, counted from
  the window's start (speech already under way counts from there), spans at least
  ``MIN_TAKEOVER_S`` (1 s) from its first onset to the end of the last segment that
  begins inside the window (which may run past the window). A reply of 4 quick words
  under a second counts for FDB and not here. See :func:`floor_taken`.
- **Pause handling**: the window is the user's mid-turn pause; any takeover there is
  wrong (lower is better). FDB: Moshi 0.985 on its synthetic pauses.
- **Smooth turn-taking**: the window runs from the user's end of turn to their next
  onset (or the end of the stimulus); a takeover is right (higher is better) and its
  latency is its onset minus the end of turn, clipped at 0 as FDB does. FDB: Moshi
  0.941, latency 0.265 s (mean).
- **User interruption**: FDB scores the model's reply to an interrupting turn with the
  same rule (TOR and latency from the end of the interruption: Moshi 1.000 and 0.257 s).
  That is ``interrupt_takeover`` and ``interrupt_response_ms_p50`` here. How fast the model
  *stops* once the user starts over it (FDB v1.5's stop latency) is
  ``interrupt_stop_ms_p50``: the end of the model's speech run (segments merged across
  gaps under ``MERGE_GAP_S``) that covers the interruption's onset, minus that onset.
  An interruption the model was not speaking at is not scored (``interruptions_scored``).

The stimulus is built here too (:func:`build_stimulus`: user turns with mid-turn pauses,
silences after ends of turn, and barge-in turns meant to start while the model answers),
so its annotations are known by construction and the scoring needs no labels. What the
client hears is :func:`playout`'s model of it, and :func:`oracle_track` is a perfect
agent's answer to the same stimulus: scored through the same VAD, it gives the floor the
measurement itself adds (the VAD's onset and offset lag) and the ideal rates.

Everything but :func:`vad_segments` is pure numpy on seconds; nothing here knows about
Ray or websockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

MIN_TAKEOVER_S = 1.0
"""FDB's ``turn_duration_threshold``: the model's speech must span this long to count as a
takeover (FDB's alternative, more than 3 words, needs an ASR: not used here)."""
MERGE_GAP_S = 0.3
"""Gaps shorter than this inside the model's speech do not end a run (for the stop
latency): a breath between words is not the model yielding the floor."""

Segment = tuple[float, float]
"""A span of speech, (start, end) in seconds from the start of the stimulus."""


# -- the stimulus and its annotations -------------------------------------------------------
@dataclass(frozen=True)
class UserTurn:
    start_s: float
    end_s: float
    barge_in: bool = False
    """The turn is meant to start while the model answers the turn before it."""


class Window(NamedTuple):
    """The span after a user's end of turn in which the model may take the floor."""

    start_s: float  # the user's end of turn
    end_s: float  # the user's next onset, or the end of the stimulus
    after_interruption: bool  # the turn that ended was a barge-in
    interrupted: bool  # the next turn is a barge-in


@dataclass(frozen=True)
class Annotations:
    """What is known about a stimulus: the user's turns and their mid-turn pauses."""

    duration_s: float
    turns: tuple[UserTurn, ...]
    pauses: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        last = 0.0
        for t in self.turns:
            if not (last <= t.start_s < t.end_s <= self.duration_s):
                raise ValueError(f"turns must be ordered, disjoint, within the stimulus: {t}")
            last = t.end_s
        for a, b in self.pauses:
            if not any(t.start_s < a < b < t.end_s for t in self.turns):
                raise ValueError(f"pause ({a}, {b}) is not inside a user turn")

    def windows(self) -> list[Window]:
        out = []
        for i, t in enumerate(self.turns):
            nxt = self.turns[i + 1] if i + 1 < len(self.turns) else None
            end = nxt.start_s if nxt is not None else self.duration_s
            out.append(Window(t.end_s, end, t.barge_in, bool(nxt and nxt.barge_in)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "turns": [
                {"start_s": t.start_s, "end_s": t.end_s, "barge_in": t.barge_in} for t in self.turns
            ],
            "pauses": [list(p) for p in self.pauses],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], duration_s: float | None = None) -> Annotations:
        """From :meth:`to_json`'s form; ``duration_s`` (the audio's) wins over the file's."""
        turns = tuple(
            UserTurn(float(t["start_s"]), float(t["end_s"]), bool(t.get("barge_in", False)))
            for t in obj["turns"]
        )
        pauses = tuple((float(a), float(b)) for a, b in obj.get("pauses", []))
        duration = duration_s if duration_s is not None else float(obj["duration_s"])
        return cls(duration, turns, pauses)


@dataclass(frozen=True)
class TurnSpec:
    """One user turn to build: speech ``pieces`` separated by mid-turn pauses of
    ``pause_s``, starting ``gap_before_s`` after the previous turn (or the lead-in)."""

    pieces: tuple[np.ndarray, ...]
    gap_before_s: float
    pause_s: float = 0.0
    barge_in: bool = False


def build_stimulus(
    specs: Sequence[TurnSpec], rate: int, tail_s: float
) -> tuple[np.ndarray, Annotations]:
    """The user's side of a conversation as one track, and its annotations: each turn's
    start and end, and every pause between two of its pieces. Times are exact (sample
    positions), so a piece should start and end with its speech (no silence around it)."""
    parts: list[np.ndarray] = []
    turns, pauses = [], []
    n = 0

    def silence(seconds: float) -> None:
        nonlocal n
        k = round(seconds * rate)
        parts.append(np.zeros(k, np.float32))
        n += k

    for spec in specs:
        if not spec.pieces:
            raise ValueError("a turn needs at least one piece of speech")
        silence(spec.gap_before_s)
        start = n
        for i, piece in enumerate(spec.pieces):
            if i:
                a = n
                silence(spec.pause_s)
                pauses.append((a / rate, n / rate))
            parts.append(np.asarray(piece, np.float32))
            n += len(piece)
        turns.append(UserTurn(start / rate, n / rate, spec.barge_in))
    silence(tail_s)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return audio, Annotations(n / rate, tuple(turns), tuple(pauses))


# -- what the client hears ---------------------------------------------------------------------
def playout(
    chunks: Sequence[tuple[float, np.ndarray]],
    drops: Sequence[float],
    rate: int,
    duration_s: float,
) -> np.ndarray:
    """The model's audio as a client with no jitter buffer plays it: each chunk
    (arrival time, samples) starts when it arrives or when the audio queued before it has
    played, whichever is later; at each drop time (an ``interrupt`` event) whatever is
    queued and not yet played is discarded. ``duration_s`` long; later audio is cut."""
    n = round(duration_s * rate)
    track = np.zeros(n, np.float32)
    events = sorted(
        [(t, 1, i) for i, (t, _) in enumerate(chunks)] + [(t, 0, -1) for t in drops],
        key=lambda e: (e[0], e[1]),  # a drop before a chunk that arrives with it
    )
    play_end = 0  # sample at which the queued audio runs out
    for t, is_chunk, i in events:
        now = max(0, round(t * rate))
        if not is_chunk:
            if play_end > now:
                track[now : min(play_end, n)] = 0.0
                play_end = now
            continue
        pcm = np.asarray(chunks[i][1], np.float32)
        start = max(now, play_end)
        stop = start + len(pcm)
        if start < n:
            track[start : min(stop, n)] = pcm[: n - start]
        play_end = stop
    return track


def oracle_track(
    ann: Annotations, speech: np.ndarray, rate: int, respond_s: float = 2.0
) -> np.ndarray:
    """A perfect agent's answer: silent through every pause, speaking from the very end of
    each user turn (for ``respond_s``, or until the user's next onset if sooner), and
    through to the onset of a barge-in turn, where it stops at once. ``speech`` is taken
    in order (and repeated if short); it should be continuous speech."""
    track = np.zeros(round(ann.duration_s * rate), np.float32)
    pos = 0
    for w in ann.windows():
        a = round(w.start_s * rate)
        span = w.end_s - w.start_s if w.interrupted else min(respond_s, w.end_s - w.start_s)
        k = round(span * rate)
        idx = (pos + np.arange(k)) % len(speech)
        track[a : a + k] = speech[idx][: len(track) - a]
        pos += k
    return track


# -- the VAD ----------------------------------------------------------------------------------
def segments_from_flags(flags: np.ndarray, frame_s: float) -> list[Segment]:
    """Runs of true frames → (start, end) seconds."""
    f = np.concatenate([[False], np.asarray(flags, bool), [False]])
    edges = np.flatnonzero(np.diff(f.astype(np.int8))).reshape(-1, 2)  # (on, off) pairs
    return [(float(a * frame_s), float(b * frame_s)) for a, b in edges]


def vad_segments(audio: np.ndarray, rate: int, threshold: float = 0.5) -> list[Segment]:
    """Where ``audio`` holds speech, by silero-vad (``voxtral.vad``) at 16 kHz with its
    hysteresis rule (speech from ``p >= threshold`` until ``p < threshold - 0.15``)."""
    from voxtral.audio import prepare
    from voxtral.vad import FRAME_S, BatchedVAD, hysteresis, off_threshold

    if not len(audio):
        return []
    x = prepare(np.asarray(audio, np.float32), rate, 16000).numpy()
    vad = BatchedVAD(16000)
    probs = np.concatenate([vad.push(x), vad.flush()])
    return segments_from_flags(hysteresis(probs, threshold, off_threshold(threshold)), FRAME_S)


# -- the scores -------------------------------------------------------------------------------
def merge(segments: Sequence[Segment], gap_s: float) -> list[Segment]:
    """Sorted segments joined where the silence between them is shorter than ``gap_s``."""
    out: list[Segment] = []
    for a, b in sorted(segments):
        if out and a - out[-1][1] < gap_s:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def floor_taken(
    model: Sequence[Segment], start: float, end: float, min_s: float = MIN_TAKEOVER_S
) -> float | None:
    """FDB's turn-over rule on VAD segments for the window [start, end): the model's
    segments that overlap it (they begin before ``end``), counted from ``start`` on. If
    they span ``min_s`` or more (first onset to the last one's end, which may lie past
    ``end``), the model took the floor: the latency (first onset − ``start``, 0 if it was
    already speaking) is returned; else None."""
    inside = [(max(a, start), b) for a, b in model if a < end and b > start]
    if not inside:
        return None
    onset = min(a for a, _ in inside)
    offset = max(b for _, b in inside)
    return onset - start if offset - onset >= min_s else None


def stop_latency(
    model: Sequence[Segment], onset: float, gap_s: float = MERGE_GAP_S
) -> float | None:
    """How long the model kept speaking after the user's ``onset``: the end of its speech
    run (gaps under ``gap_s`` bridged) that covers ``onset`` (0 for one that ends right
    there), minus ``onset``; None when it was not speaking then."""
    for a, b in merge(model, gap_s):
        if a <= onset <= b:
            return b - onset
    return None


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 3) if flags else None


def _ms(values: list[float], how: str = "p50") -> float | None:
    if not values:
        return None
    v = np.median(values) if how == "p50" else np.mean(values)
    return round(float(v) * 1000, 1)


def score(
    model: Sequence[Segment],
    ann: Annotations,
    min_s: float = MIN_TAKEOVER_S,
    gap_s: float = MERGE_GAP_S,
) -> dict[str, Any]:
    """The model's speech segments against the stimulus's annotations → the figures (rates
    in [0, 1], latencies in ms; None where no event of the kind could be scored)."""
    pause = [floor_taken(model, a, b, min_s) for a, b in ann.pauses]
    windows = ann.windows()
    turn = [floor_taken(model, w.start_s, w.end_s, min_s) for w in windows]
    answers = [lat for lat, w in zip(turn, windows, strict=True) if w.after_interruption]
    regular = [lat for lat, w in zip(turn, windows, strict=True) if not w.after_interruption]
    stops = [stop_latency(model, t.start_s, gap_s) for t in ann.turns if t.barge_in]

    def taken(xs):
        return [x for x in xs if x is not None]

    return {
        "takeover_pause": _rate([x is not None for x in pause]),
        "takeover_turn": _rate([x is not None for x in regular]),
        "turn_latency_ms_p50": _ms(taken(regular)),
        "turn_latency_ms_mean": _ms(taken(regular), "mean"),
        "interrupt_stop_ms_p50": _ms(taken(stops)),
        "interrupt_takeover": _rate([x is not None for x in answers]),
        "interrupt_response_ms_p50": _ms(taken(answers)),
        "pauses": len(pause),
        "turn_ends": len(regular),
        "interruptions": len(stops),
        "interruptions_scored": len(taken(stops)),
    }


BURST_GAP_S = 1.0
"""Audio messages further apart than this belong to different bursts (model turns)."""


def stream_rtf(
    arrivals: Sequence[tuple[float, int]],
    drops: Sequence[float],
    rate: int,
    gap_s: float = BURST_GAP_S,
) -> float | None:
    """Wall seconds per second of model audio while it streams, from the client's side:
    the messages (arrival time, samples) are cut into bursts where they are more than
    ``gap_s`` apart or an ``interrupt`` (a time in ``drops``) falls between them; over the
    bursts, the time from each one's first message to its last per second of audio after
    its first. Near 1 (or below, for a server that runs ahead): the audio arrives as fast
    as it plays; above 1: the listener hears gaps. None with no burst of two messages.
    A half-duplex server's turns and a full-duplex server's one long stream are measured
    alike; a server more than ``gap_s`` late for every message is not measured at all."""
    wall = audio = 0.0
    burst: list[tuple[float, int]] = []
    cuts = sorted(drops)

    def close() -> None:
        nonlocal wall, audio
        if len(burst) > 1:
            wall += burst[-1][0] - burst[0][0]
            audio += sum(n for _, n in burst[1:]) / rate

    for t, n in sorted(arrivals):
        if burst and (t - burst[-1][0] > gap_s or any(burst[-1][0] <= d < t for d in cuts)):
            close()
            burst = []
        burst.append((t, n))
    close()
    return round(wall / audio, 4) if audio > 0 else None


def server_rtf(turn_stats: Sequence[dict[str, Any]]) -> float | None:
    """The server's processing ratio: engine-busy seconds per second of audio it generated,
    summed over the ``turn_end`` events that report both (below 1: faster than real
    time); None when none does (a turn cut by an interrupt reports nothing)."""
    rows = [s for s in turn_stats if s.get("busy_s") is not None and s.get("audio_s")]
    audio = sum(float(s["audio_s"]) for s in rows)
    return round(sum(float(s["busy_s"]) for s in rows) / audio, 4) if audio > 0 else None
