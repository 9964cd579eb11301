"""A chunk's words: caption words or Whisper's, one structure for both (``schema.WORD``).

Pure functions, no Ray: which chunks need speech recognition under ``text.source``, the
words a token row is made from and where they came from (``text_source``).
"""

from __future__ import annotations

from collections.abc import Sequence


def has_words(words: Sequence[dict] | None) -> bool:
    """Whether a word list holds at least one word that is not blank."""
    return any((w.get("word") or "").strip() for w in words or () if w)


def needs_asr(captions: Sequence[dict] | None, source: str) -> bool:
    """Whether Whisper runs on a chunk: ``asr`` always, ``auto`` where the chunk has no
    caption words, ``captions`` never."""
    return source == "asr" or (source == "auto" and not has_words(captions))


def as_words(words: Sequence[dict] | None) -> list[dict]:
    """Caption or Whisper words → :data:`voxtral.schema.WORD` dicts, time-ordered, blanks
    dropped; ``speaker`` kept as text where the source has one (chunk rows from before
    diarisation have none), else null."""
    out = []
    for w in words or ():
        if not w or not (w.get("word") or "").strip():
            continue
        speaker = w.get("speaker")
        out.append(
            {
                "word": w["word"].strip(),
                "start_s": float(w["start_s"]),
                "end_s": float(w["end_s"] if w.get("end_s") is not None else w["start_s"]),
                "speaker": None if speaker is None else str(speaker),
            }
        )
    return sorted(out, key=lambda w: w["start_s"])


def choose_words(
    captions: Sequence[dict] | None,
    asr_words: Sequence[dict] | None,
    turns: Sequence[dict] | None = None,
) -> tuple[list[dict], str]:
    """A chunk's words and their ``text_source``: Whisper's where it ran on the chunk
    (``asr_words`` not null: the plan ran it only where ``text.source`` asks), else the
    captions; ``none`` when the chosen source holds no word. ``turns`` (the chunk's, from
    diarisation) give each word without a speaker its speaker."""
    if asr_words is not None:
        words = with_speakers(as_words(asr_words), turns)
        return words, "asr" if words else "none"
    words = with_speakers(as_words(captions), turns)
    return words, "captions" if words else "none"


def speaker_of(turns: list[dict], start_s: float, end_s: float) -> str | None:
    """The speaker whose turns cover most of ``[start_s, end_s]`` (a word), or the nearest
    turn's within half a second (a word's edges may stick out of the speech the VAD saw);
    None when there is none."""
    best, best_cover = None, 0.0
    for t in turns:
        cover = min(t["end_s"], end_s) - max(t["start_s"], start_s)
        if cover > best_cover:
            best, best_cover = t["speaker"], cover
    if best is not None:
        return best
    mid = (start_s + end_s) / 2
    near = min(turns, key=lambda t: min(abs(t["start_s"] - mid), abs(t["end_s"] - mid)),
               default=None)  # fmt: skip
    if near is not None and min(abs(near["start_s"] - mid), abs(near["end_s"] - mid)) <= 0.5:
        return near["speaker"]
    return None


def with_speakers(words: list[dict], turns: Sequence[dict] | None) -> list[dict]:
    """Words without a speaker (Whisper's; captions from before diarisation) get the one
    whose turns cover them (:func:`speaker_of`); a word that has one keeps it."""
    if not turns:
        return words
    return [
        w
        if w["speaker"] is not None
        else {**w, "speaker": speaker_of(turns, w["start_s"], w["end_s"])}
        for w in words
    ]
