"""Timed caption words from WebVTT, and the words that fall in a chunk.

Two kinds of WebVTT reach us: YouTube's automatic captions (each word carries an inline
``<hh:mm:ss.mmm>`` timestamp, and every cue repeats the previous cue's line) and plain
phrase cues (sidecars of local files). Both become a flat, time-sorted list of words;
words without their own timestamp share their cue's span in proportion to their length.
"""

from __future__ import annotations

import bisect
import html
import re
from dataclasses import dataclass

_TS = r"(?:(\d+):)?(\d{1,2}):(\d{2})[.,](\d{3})"
_CUE_TIMING = re.compile(rf"^\s*{_TS}\s*-->\s*{_TS}")
_INLINE_TS = re.compile(rf"<{_TS}>")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_NON_SPEECH = re.compile(r"^\[.*\]$|^\(.*\)$|^♪+$")
LAST_WORD_S = 0.5
"""Assumed length of a timed word at the end of a line, whose cue may run on long after."""


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    end_s: float


def _seconds(h: str | None, m: str, s: str, ms: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _spread(text: str, start: float, end: float) -> list[Word]:
    """Words of ``text`` over ``[start, end)`` in proportion to their length."""
    tokens = [t for t in html.unescape(_TAG.sub("", text)).split() if not _NON_SPEECH.match(t)]
    if not tokens:
        return []
    total = sum(len(t) + 1 for t in tokens)
    span = max(0.0, end - start)
    out, t = [], start
    for tok in tokens:
        dt = span * (len(tok) + 1) / total
        out.append(Word(tok, round(t, 3), round(t + dt, 3)))
        t += dt
    return out


def _line_words(line: str, cue_start: float, cue_end: float) -> list[Word]:
    """Words of one cue line, using its inline timestamps when it has them."""
    parts = _INLINE_TS.split(line)
    # split() yields: text, h, m, s, ms, text, h, m, s, ms, text ...
    segments = [(cue_start, parts[0])]
    for i in range(1, len(parts), 5):
        segments.append((_seconds(*parts[i : i + 4]), parts[i + 4]))
    words: list[Word] = []
    for j, (t0, text) in enumerate(segments):
        if j + 1 < len(segments):
            t1 = segments[j + 1][0]
        elif len(segments) > 1:  # the last timed word: its cue often runs on past it
            t1 = min(cue_end, t0 + LAST_WORD_S * max(1, len(_TAG.sub("", text).split())))
        else:
            t1 = cue_end
        words.extend(_spread(text, t0, max(t0, min(t1, cue_end))))
    return words


def parse_vtt(text: str) -> list[Word]:
    """All spoken words of a WebVTT document, sorted by start time."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    karaoke = bool(_INLINE_TS.search(text))
    words: list[Word] = []
    previous: set[str] = set()
    for block in re.split(r"\n\n+", text):  # a line of spaces is payload, not a break
        lines = block.split("\n")
        timing = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if timing is None:
            continue
        m = _CUE_TIMING.match(lines[timing])
        if not m:
            continue
        start, end = _seconds(*m.groups()[:4]), _seconds(*m.groups()[4:])
        if end < start:
            continue
        body = [ln for ln in lines[timing + 1 :] if ln.strip()]
        current = {_TAG.sub("", _INLINE_TS.sub("", ln)).strip() for ln in body}
        for ln in body:
            plain = _TAG.sub("", _INLINE_TS.sub("", ln)).strip()
            if karaoke and plain in previous and not _INLINE_TS.search(ln):
                continue  # YouTube repeats the line before as context
            words.extend(_line_words(ln, start, end))
        previous = current
    words.sort(key=lambda w: (w.start_s, w.end_s))
    deduped: list[Word] = []
    for w in words:
        if deduped and deduped[-1].word == w.word and abs(deduped[-1].start_s - w.start_s) < 1e-3:
            continue
        deduped.append(w)
    return deduped


class CaptionIndex:
    """Words of one video, for quick lookup of the words inside each chunk."""

    def __init__(self, words: list[Word]):
        self.words = sorted(words, key=lambda w: (w.start_s + w.end_s) / 2)
        self._mids = [(w.start_s + w.end_s) / 2 for w in self.words]

    def __len__(self) -> int:
        return len(self.words)

    def within(self, start_s: float, end_s: float) -> list[dict]:
        """Words whose midpoint lies in ``[start_s, end_s)``, timed relative to ``start_s``, in
        order of their start (two speakers' words may overlap: the midpoints' order differs)."""
        lo = bisect.bisect_left(self._mids, start_s)
        hi = bisect.bisect_left(self._mids, end_s)
        dur = end_s - start_s
        inside = sorted(self.words[lo:hi], key=lambda w: (w.start_s, w.end_s))  # as spoken
        return [
            {
                "word": w.word,
                "start_s": round(min(max(0.0, w.start_s - start_s), dur), 3),
                "end_s": round(min(max(0.0, w.end_s - start_s), dur), 3),
            }
            for w in inside
        ]
