"""The token layout: one contract shared by preprocess, train and serve.

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

Codes and text go in and out of a layout's id streams in :mod:`voxtral.interleave`; the
codec and the text tokenizer are bound to a layout in :mod:`voxtral.tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from voxtral.codec import CodecInfo
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
