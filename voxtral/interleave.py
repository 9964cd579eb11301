"""Codes and timed text ⇄ the id streams of a :class:`~voxtral.layout.Layout`.

Pure functions of arrays: ``encode_ids`` interleaves (preprocess, the server's microphone),
``StreamDecoder`` / ``decode_ids`` take any ids a model may produce back apart, never
raising on them (the export sample, the server's output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from voxtral.layout import Layout, LayoutError


# -- layout → ids ----------------------------------------------------------------------
def place_text(
    layout: Layout, groups: int, text_ids: np.ndarray, text_starts_s: np.ndarray
) -> np.ndarray:
    """Text slot contents of ``groups`` groups: each token ``text_lead_s`` before its time.

    A token goes to the group that starts ``text_lead_s`` before its time (clamped at 0);
    when that slot is taken it moves to the next free one, keeping order. Tokens that do not
    fit before the end are dropped.
    """
    out = np.full(groups, layout.vocab.text_pad, dtype=np.int64)
    cursor = 0
    order = np.argsort(np.asarray(text_starts_s, dtype=np.float64), kind="stable")
    for i in order:
        # the epsilon keeps a time on a group boundary in that group despite float rounding
        # ((0.58 - 0.5) / 0.04 is 1.9999999999999996)
        lead = (float(text_starts_s[i]) - layout.text_lead_s) / layout.group_s
        target = max(0, math.floor(lead + 1e-9))
        cursor = max(cursor, target)
        if cursor >= groups:
            break
        out[cursor] = int(text_ids[i])
        cursor += 1
    return out


def _checked_codes(layout: Layout, codes: np.ndarray, name: str) -> np.ndarray:
    codes = np.asarray(codes)
    v = layout.vocab
    if codes.ndim != 2 or codes.shape[0] != v.n_q:
        raise LayoutError(f"{name} must be [n_q={v.n_q}, F], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= v.codebook_size):
        raise LayoutError(f"{name} must lie in [0, {v.codebook_size})")
    return codes


def audio_slot_ids(layout: Layout, codes: np.ndarray, groups: int) -> np.ndarray:
    """Codes ``[n_q, F]`` → ``[groups, frames_per_group * n_q]`` ids of one stream's audio
    slots, in slot order (frame-major): e.g. what a microphone gives a 2-stream group."""
    v, fpg = layout.vocab, layout.frames_per_group
    audio = codes[:, : groups * fpg].astype(np.int64).reshape(v.n_q, groups, fpg)
    audio = audio.transpose(1, 2, 0) + (v.audio_offset + np.arange(v.n_q) * v.codebook_size)
    return audio.reshape(groups, fpg * v.n_q)


def encode_ids(
    layout: Layout,
    codes: np.ndarray,
    text_ids: np.ndarray | None = None,
    text_starts_s: np.ndarray | None = None,
    bos: bool = True,
    user_codes: np.ndarray | None = None,
) -> np.ndarray:
    """Codes ``[n_q, F]`` (+ timed text ids) → the id stream. Trailing frames that do not fill
    a whole group are left out (less than one group of audio).

    With a 2-stream layout ``codes`` is the model's track and ``user_codes`` (required, same
    ``F``) the user's, time-aligned; a 1-stream layout takes no ``user_codes``."""
    v = layout.vocab
    codes = _checked_codes(layout, codes, "codes")
    tracks = {"model": codes}
    if layout.streams == 1:
        if user_codes is not None:
            raise LayoutError("user_codes given, but the layout has 1 stream (tokenizer.streams)")
    else:
        if user_codes is None:
            raise LayoutError("a 2-stream layout needs user_codes (the user's track)")
        tracks["user"] = _checked_codes(layout, user_codes, "user_codes")
        if tracks["user"].shape[1] != codes.shape[1]:
            raise LayoutError(
                f"user_codes has {tracks['user'].shape[1]} frames, codes has {codes.shape[1]}: "
                "the two tracks must be time-aligned"
            )
    groups = codes.shape[1] // layout.frames_per_group
    parts = [audio_slot_ids(layout, tracks[s], groups) for s in layout.audio_streams]
    if layout.text:
        if text_ids is None or len(text_ids) == 0:
            text = np.full(groups, v.text_pad, dtype=np.int64)
        else:
            text_ids = np.asarray(text_ids)
            if text_ids.min() < 0 or text_ids.max() >= v.text_size:
                raise LayoutError(f"text ids must lie in [0, {v.text_size})")
            text = place_text(layout, groups, text_ids, np.asarray(text_starts_s))
        parts.insert(0, text[:, None])
    body = np.concatenate(parts, axis=1).reshape(-1)
    return np.concatenate([[v.bos], body]).astype(np.int64) if bos else body


# -- ids → codes + text ----------------------------------------------------------------
class Decoded(NamedTuple):
    """What ids decode to: the model's frames ``[n_q, f]`` int64, its text ids, and the user's
    frames ``[n_q, f']`` int64 (always empty with one stream)."""

    model: np.ndarray
    text: list[int]
    user: np.ndarray


@dataclass
class StreamDecoder:
    """Incremental ids → (frames, text ids), for any id sequence a model may produce.

    Tokens that are not allowed at their position (wrong slot, out of range, padding rows)
    are dropped; the codebook they should have filled repeats its stream's previous code so
    audio keeps its timing. A frame is released only once all its codebooks have been seen,
    so a partial frame is held back until the next push. Never raises on ids.
    """

    layout: Layout
    index: int = 1  # stream position of the next id (0 is <bos>)
    _frame: dict[str, list[int | None]] = field(default_factory=dict)
    _last: dict[str, list[int]] = field(default_factory=dict)
    dropped: int = 0

    def __post_init__(self) -> None:
        n_q = self.layout.vocab.n_q
        self._frame = {s: [None] * n_q for s in self.layout.audio_streams}
        self._last = {s: [0] * n_q for s in self.layout.audio_streams}

    def push(self, ids) -> tuple[np.ndarray, list[int]]:
        """Feed ids; return (complete model frames ``[n_q, f]`` int64, text ids) they
        completed. User frames (2 streams) are decoded but not returned: see
        :meth:`push_duplex`."""
        model, text, _ = self.push_duplex(ids)
        return model, text

    def push_duplex(self, ids) -> Decoded:
        """Feed ids; return the model frames, text ids and user frames they completed."""
        v = self.layout.vocab
        frames: dict[str, list[list[int]]] = {"model": [], "user": []}
        text: list[int] = []
        for raw in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            index, self.index = self.index, self.index + 1
            slot = self.layout.slot_at(index)
            ok = self.layout.is_allowed(index, raw)
            if not ok:
                self.dropped += 1
            if slot is None:
                continue
            if slot.kind == "text":
                if ok and raw < v.text_size:
                    text.append(raw)
                continue
            partial, last = self._frame[slot.stream], self._last[slot.stream]
            partial[slot.q] = raw - v.audio_range(slot.q)[0] if ok else last[slot.q]
            if slot.q == v.n_q - 1:
                frame = [last[q] if c is None else c for q, c in enumerate(partial)]
                frames[slot.stream].append(frame)
                self._last[slot.stream] = frame
                self._frame[slot.stream] = [None] * v.n_q

        def as_codes(rows: list[list[int]]) -> np.ndarray:
            return np.asarray(rows, dtype=np.int64).reshape(-1, v.n_q).T

        return Decoded(as_codes(frames["model"]), text, as_codes(frames["user"]))


def decode_ids(layout: Layout, ids, start: int = 0) -> tuple[np.ndarray, list[int]]:
    """Any id sequence → (model codes ``[n_q, F]``, text ids); ``start`` is the stream
    position of ``ids[0]`` (0 when it begins with ``<bos>``). A trailing partial frame is left
    out. With 2 streams the user's track is left out too: see :func:`decode_duplex_ids`."""
    return StreamDecoder(layout, index=start).push(ids)


def decode_duplex_ids(layout: Layout, ids, start: int = 0) -> Decoded:
    """Like :func:`decode_ids`, also returning the user's codes (empty with one stream)."""
    return StreamDecoder(layout, index=start).push_duplex(ids)
