"""The multimodal tokenizer: one contract shared by preprocess, train and serve.

**Vocabulary.** Text ids are ``[0, V_text)`` (the base model's own); codebook ``q``'s code
``c`` is ``V_text + q * K + c``; the special tokens (``<text_pad>``, ``<bos>``, ``<eos>``)
follow. The embedding matrix is padded to a multiple of 64 rows; padding rows are never
allowed at generation time.

**Layout.** A stream is ``<bos>`` followed by groups. A group is a list of *slots* (one text
slot, then ``frames_per_group`` whole codec frames, frame-major: ``f0q0 f0q1 … f1q0 …``).
The layout is a description (``Layout.slots``), not hard-coded offsets, so a second audio
stream can be added later without rewriting its users. Text (timed caption tokens) leads its
audio by ``text_lead_s``; empty text slots hold ``<text_pad>`` (never EOS).

Everything here is a pure function of arrays except :class:`MultimodalTokenizer`, which
binds a codec and a text tokenizer to a layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

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


@dataclass(frozen=True)
class Slot:
    kind: Literal["text", "audio"]
    frame: int = 0
    q: int = 0


@dataclass(frozen=True)
class Layout:
    vocab: Vocab
    frame_rate: float
    frames_per_group: int
    text: bool = True
    text_lead_s: float = 0.0
    codec: str = ""
    sample_rate: int = 0
    slots: tuple[Slot, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.frames_per_group < 1:
            raise LayoutError("a group needs at least one codec frame")
        slots = [Slot("text")] if self.text else []
        slots += [
            Slot("audio", f, q) for f in range(self.frames_per_group) for q in range(self.vocab.n_q)
        ]
        object.__setattr__(self, "slots", tuple(slots))

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
        return cls(vocab=vocab, **{k: d[k] for k in keys})


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
    )


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


def encode_ids(
    layout: Layout,
    codes: np.ndarray,
    text_ids: np.ndarray | None = None,
    text_starts_s: np.ndarray | None = None,
    bos: bool = True,
) -> np.ndarray:
    """Codes ``[n_q, F]`` (+ timed text ids) → the id stream. Trailing frames that do not fill
    a whole group are left out (less than one group of audio)."""
    codes = np.asarray(codes)
    v = layout.vocab
    if codes.ndim != 2 or codes.shape[0] != v.n_q:
        raise LayoutError(f"codes must be [n_q={v.n_q}, F], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= v.codebook_size):
        raise LayoutError(f"codes must lie in [0, {v.codebook_size})")
    fpg = layout.frames_per_group
    groups = codes.shape[1] // fpg
    audio = codes[:, : groups * fpg].astype(np.int64).reshape(v.n_q, groups, fpg)
    audio = audio.transpose(1, 2, 0) + (v.audio_offset + np.arange(v.n_q) * v.codebook_size)
    parts = [audio.reshape(groups, fpg * v.n_q)]
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
@dataclass
class StreamDecoder:
    """Incremental ids → (frames, text ids), for any id sequence a model may produce.

    Tokens that are not allowed at their position (wrong slot, out of range, padding rows)
    are dropped; the codebook they should have filled repeats its previous code so audio
    keeps its timing. A frame is released only once all its codebooks have been seen, so a
    partial frame is held back until the next push. Never raises on ids.
    """

    layout: Layout
    index: int = 1  # stream position of the next id (0 is <bos>)
    _frame: list[int | None] = field(default_factory=list)
    _last: list[int] = field(default_factory=list)
    dropped: int = 0

    def __post_init__(self) -> None:
        self._frame = [None] * self.layout.vocab.n_q
        self._last = [0] * self.layout.vocab.n_q

    def push(self, ids) -> tuple[np.ndarray, list[int]]:
        """Feed ids; return (complete frames ``[n_q, f]`` int64, text ids) they completed."""
        v = self.layout.vocab
        frames: list[list[int]] = []
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
            code = raw - v.audio_range(slot.q)[0] if ok else self._last[slot.q]
            self._frame[slot.q] = code
            if slot.q == v.n_q - 1:
                frame = [self._last[q] if c is None else c for q, c in enumerate(self._frame)]
                frames.append(frame)
                self._last = frame
                self._frame = [None] * v.n_q
        arr = np.asarray(frames, dtype=np.int64).reshape(-1, v.n_q).T
        return arr, text


def decode_ids(layout: Layout, ids, start: int = 0) -> tuple[np.ndarray, list[int]]:
    """Any id sequence → (codes ``[n_q, F]``, text ids); ``start`` is the stream position of
    ``ids[0]`` (0 when it begins with ``<bos>``). A trailing partial frame is left out."""
    return StreamDecoder(layout, index=start).push(ids)


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
