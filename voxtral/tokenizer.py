"""The multimodal tokenizer: one contract shared by preprocess, train and serve.

**Vocabulary.** Text ids are ``[0, V_text)`` (the base model's own); codebook ``q``'s code
``c`` is ``V_text + q * K + c``; the special tokens (``<text_pad>``, ``<bos>``, ``<eos>``)
follow. The embedding matrix is padded to a multiple of 64 rows; padding rows are never
allowed at generation time.

**Layout.** A sequence is ``<bos>`` followed by groups. A group is a list of *slots*. With
one stream (``streams=1``) a group is one text slot, then ``frames_per_group`` whole codec
frames of the model's speech, frame-major: ``f0q0 f0q1 … f1q0 …``. With two streams (full
duplex, Moshi-style) the text slot is followed by the model's ``frames_per_group`` frames and
the user's ``frames_per_group`` frames, each frame-major, the model's first when
``model_first`` (else the user's first). Both audio streams use the same codebook id ranges,
so the vocabulary does not grow. Every slot belongs to a stream (``Slot.stream``: text is the
model's): model slots are *sampled* at generation, user slots are input only (filled from the
microphone, still validated by ``allowed_mask``). The layout is a description
(``Layout.slots``), not hard-coded offsets, so its users never compute positions by hand.
Text (timed caption tokens) leads its audio by ``text_lead_s``; empty text slots hold
``<text_pad>`` (never EOS).

Everything here is a pure function of arrays except :class:`MultimodalTokenizer`, which
binds a codec and a text tokenizer to a layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np
import torch

from voxtral.audio import prepare
from voxtral.codec import Codec, CodecInfo
from voxtral.config import TokenizerConfig

SPECIALS = ("<text_pad>", "<bos>", "<eos>")
EMBED_MULTIPLE = 64


class LayoutError(ValueError):
    """A tokenizer layout that cannot exist (e.g. a group that is not whole frames)."""


@dataclass(frozen=True)
class Vocab:
    text_size: int
    n_q: int
    codebook_size: int

    @property
    def audio_offset(self) -> int:
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.n_q * self.codebook_size

    @property
    def text_pad(self) -> int:
        return self.special_offset + SPECIALS.index("<text_pad>")

    @property
    def bos(self) -> int:
        return self.special_offset + SPECIALS.index("<bos>")

    @property
    def eos(self) -> int:
        return self.special_offset + SPECIALS.index("<eos>")

    @property
    def size(self) -> int:
        return self.special_offset + len(SPECIALS)

    @property
    def padded_size(self) -> int:
        """Embedding rows: ``size`` rounded up to a multiple of 64 (tensor-core friendly)."""
        return math.ceil(self.size / EMBED_MULTIPLE) * EMBED_MULTIPLE

    def audio_range(self, q: int) -> tuple[int, int]:
        lo = self.audio_offset + q * self.codebook_size
        return lo, lo + self.codebook_size


StreamName = Literal["model", "user"]


class Track(IntEnum):
    """What a sequence position holds, as a small int (e.g. for per-track loss weights)."""

    BOS = -1
    TEXT = 0
    MODEL_AUDIO = 1
    USER_AUDIO = 2


@dataclass(frozen=True)
class Slot:
    kind: Literal["text", "audio"]
    frame: int = 0
    q: int = 0
    stream: StreamName = "model"

    @property
    def sampled(self) -> bool:
        """Model slots are generated; user slots are given (the microphone), never sampled."""
        return self.stream == "model"

    @property
    def track(self) -> Track:
        if self.kind == "text":
            return Track.TEXT
        return Track.MODEL_AUDIO if self.stream == "model" else Track.USER_AUDIO


@dataclass(frozen=True)
class Layout:
    vocab: Vocab
    frame_rate: float
    frames_per_group: int
    text: bool = True
    text_lead_s: float = 0.0
    codec: str = ""
    sample_rate: int = 0
    streams: Literal[1, 2] = 1
    model_first: bool = True
    slots: tuple[Slot, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.frames_per_group < 1:
            raise LayoutError("a group needs at least one codec frame")
        if self.streams not in (1, 2):
            raise LayoutError(f"streams must be 1 or 2, got {self.streams!r}")
        slots = [Slot("text")] if self.text else []
        for stream in self.audio_streams:
            slots += [
                Slot("audio", f, q, stream)
                for f in range(self.frames_per_group)
                for q in range(self.vocab.n_q)
            ]
        object.__setattr__(self, "slots", tuple(slots))

    @property
    def audio_streams(self) -> tuple[StreamName, ...]:
        """The audio streams in group order."""
        if self.streams == 1:
            return ("model",)
        return ("model", "user") if self.model_first else ("user", "model")

    @property
    def group_len(self) -> int:
        return len(self.slots)

    @property
    def group_s(self) -> float:
        return self.frames_per_group / self.frame_rate

    @property
    def tokens_per_s(self) -> float:
        return self.group_len / self.group_s

    def slot_at(self, index: int) -> Slot | None:
        """Slot of position ``index`` in a stream (index 0 is ``<bos>``: None)."""
        return None if index == 0 else self.slots[(index - 1) % self.group_len]

    def seq_len_for_groups(self, groups: int) -> int:
        return 1 + groups * self.group_len

    def groups_in(self, seq_len: int) -> int:
        """Whole groups a sequence of ``seq_len`` positions holds after its ``<bos>``."""
        return max(0, (seq_len - 1) // self.group_len)

    def seconds_in(self, seq_len: int) -> float:
        """Seconds of audio a sequence of ``seq_len`` positions holds (whole groups; with
        two streams both sides of those seconds)."""
        return self.groups_in(seq_len) * self.group_s

    # -- streams -----------------------------------------------------------------------
    def is_sampled(self, index: int) -> bool:
        """Whether the model generates position ``index`` (``<bos>`` and user slots are given)."""
        slot = self.slot_at(index)
        return slot is not None and slot.sampled

    @cached_property
    def slot_tracks(self) -> np.ndarray:
        """``[group_len]`` int8: the :class:`Track` of each slot of a group (read-only)."""
        tracks = np.array([s.track for s in self.slots], dtype=np.int8)
        tracks.flags.writeable = False
        return tracks

    def sampled_positions(self, seq_len: int, start: int = 0) -> np.ndarray:
        """``[seq_len]`` bool: which positions ``start …`` the model generates."""
        tracks = position_tracks(self, seq_len, start)
        return (tracks == Track.TEXT) | (tracks == Track.MODEL_AUDIO)

    # -- allowed tokens ----------------------------------------------------------------
    def allowed_range(self, slot: Slot | None) -> list[tuple[int, int]]:
        """Half-open id ranges allowed in ``slot`` (None = the ``<bos>`` position)."""
        v = self.vocab
        if slot is None:
            return [(v.bos, v.bos + 1)]
        if slot.kind == "text":
            return [(0, v.text_size), (v.text_pad, v.text_pad + 1), (v.eos, v.eos + 1)]
        return [v.audio_range(slot.q)]

    @cached_property
    def _masks(self) -> torch.Tensor:
        """``[group_len + 1, padded_size]`` bool: row 0 the bos position, then each slot."""
        rows = [None, *self.slots]
        masks = torch.zeros(len(rows), self.vocab.padded_size, dtype=torch.bool)
        for i, slot in enumerate(rows):
            for lo, hi in self.allowed_range(slot):
                masks[i, lo:hi] = True
        return masks

    def allowed_mask(self, index: int) -> torch.Tensor:
        """Bool mask over the (padded) vocabulary of the ids allowed at stream position."""
        return self._masks[0 if index == 0 else 1 + (index - 1) % self.group_len]

    def is_allowed(self, index: int, token: int) -> bool:
        return 0 <= token < self.vocab.padded_size and bool(self.allowed_mask(index)[token])

    # -- serialisation (voxtral.json) --------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "slots"}
        d["vocab"].update(
            audio_offset=self.vocab.audio_offset,
            specials={name: self.vocab.special_offset + i for i, name in enumerate(SPECIALS)},
            size=self.vocab.size,
            padded_size=self.vocab.padded_size,
        )
        d["group_len"] = self.group_len
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        v = d["vocab"]
        vocab = Vocab(v["text_size"], v["n_q"], v["codebook_size"])
        keys = ("frame_rate", "frames_per_group", "text", "text_lead_s", "codec", "sample_rate")
        # voxtral.json files from before full duplex have no streams: one stream
        duplex = {"streams": d.get("streams", 1), "model_first": d.get("model_first", True)}
        return cls(vocab=vocab, **{k: d[k] for k in keys}, **duplex)


def make_layout(info: CodecInfo, text_size: int, cfg: TokenizerConfig) -> Layout:
    """The layout for a codec and base vocabulary; a group must be a whole number of frames."""
    if cfg.group_ms is None:
        frames = 1
    else:
        exact = cfg.group_ms / 1000 * info.frame_rate
        frames = round(exact)
        if frames < 1 or abs(exact - frames) > 1e-6:
            raise LayoutError(
                f"tokenizer.group_ms={cfg.group_ms} is {exact:g} frames of {info.name} "
                f"({info.frame_rate:g} Hz); a group must be a whole number of frames "
                f"(e.g. {1000 / info.frame_rate:g} ms per frame)"
            )
    return Layout(
        vocab=Vocab(text_size, info.n_q, info.codebook_size),
        frame_rate=info.frame_rate,
        frames_per_group=frames,
        text=cfg.text,
        text_lead_s=cfg.text_lead_s,
        codec=info.name,
        sample_rate=info.sample_rate,
        streams=cfg.streams,
        model_first=cfg.model_first,
    )


def position_tracks(layout: Layout, seq_len: int, start: int = 0) -> np.ndarray:
    """``[seq_len]`` int8: the :class:`Track` of positions ``start …`` (0 is ``<bos>``), e.g.
    to weight the loss per track without walking the slots."""
    index = np.arange(start, start + seq_len)
    tracks = layout.slot_tracks[(index - 1) % layout.group_len]
    return np.where(index == 0, np.int8(Track.BOS), tracks).astype(np.int8)


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


# -- text ------------------------------------------------------------------------------
def timed_text_ids(tokenizer, words: Sequence[dict] | None) -> tuple[list[int], list[float]]:
    """Timed words ``{word, start_s}`` → base-tokenizer ids, each timed at its word's start.

    Words are put in time order first and blank ones dropped, so the ids are time-ordered
    whatever the source did. They are tokenized as one string (so sub-word merges match how
    the base model saw text) and each token is mapped back to its word by character offsets.
    """
    words = sorted(
        (
            {**w, "word": w["word"].strip()}
            for w in words or ()
            if w and (w.get("word") or "").strip()
        ),
        key=lambda w: float(w["start_s"]),
    )
    if not words:
        return [], []
    text, spans = "", []
    for w in words:
        if text:
            text += " "
        spans.append((len(text), len(text) + len(w["word"]), float(w["start_s"])))
        text += w["word"]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts, j = [], [], 0
    # a zero-width offset is a real token too (byte-level BPE's lone "Ġ" before a word it
    # cannot merge with): it belongs to the word that follows, never dropped
    for tid, (a, _b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        while j + 1 < len(spans) and a >= spans[j][1]:
            j += 1
        ids.append(int(tid))
        starts.append(spans[j][2])
    return ids, starts


# -- codec + text tokenizer + layout ---------------------------------------------------
class MultimodalTokenizer:
    """Audio (any rate, any channels) + timed words ⇄ id streams of one layout."""

    def __init__(self, codec: Codec, text_tokenizer, layout: Layout):
        if (codec.name, codec.n_q) != (layout.codec, layout.vocab.n_q):
            raise LayoutError(
                f"layout is for {layout.codec} n_q={layout.vocab.n_q}, "
                f"codec is {codec.name} n_q={codec.n_q}"
            )
        self.codec, self.text_tokenizer, self.layout = codec, text_tokenizer, layout

    def encode_audio(self, wav, sample_rate: int) -> np.ndarray:
        """Audio → codes ``[n_q, F]``, after down-mix and resampling to the codec rate."""
        x = prepare(wav, sample_rate, self.codec.sample_rate)
        return self.codec.encode(x[None, None]).squeeze(0).cpu().numpy()

    def encode(self, wav, sample_rate: int, words: list[dict] | None = None) -> np.ndarray:
        codes = self.encode_audio(wav, sample_rate)
        ids, starts = timed_text_ids(self.text_tokenizer, words)
        return encode_ids(self.layout, codes, np.asarray(ids), np.asarray(starts))

    def decode(self, ids, start: int = 0) -> tuple[np.ndarray, str]:
        """Ids → (mono audio at the codec rate, transcript); best effort for any ids."""
        codes, text = decode_ids(self.layout, ids, start)
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32), self.text_tokenizer.decode(text)
        wav = self.codec.decode(torch.as_tensor(codes)[None])
        return wav[0, 0].float().cpu().numpy(), self.text_tokenizer.decode(text)
