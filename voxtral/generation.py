"""Streaming generation with a KV cache, batched across conversations.

Every conversation keeps its own KV cache (a list of per-layer key/value tensors) and the
ids it holds, so it can be cropped back to "what the listener actually heard" after an
interrupt, rebuilt when it outgrows the context, or dropped the moment its client leaves.
To step many conversations at once, their caches are left-padded to a common length and
stacked; positions stay each conversation's own, and the padding is masked out. Streams are
always whole groups long, so every row of a batch is at the same slot of its group and one
allowed-token mask and one set of sampling settings serve the whole step. With two streams
(full duplex) only the model's slots are sampled: the user's slots of each group are given
(the microphone's frames) and fed in one forward pass. The sampling math itself lives in
:mod:`voxtral.sampling` (shared with the training sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from voxtral.layout import Layout
from voxtral.sampling import Sampling, sample_tokens

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, heads, length, head_dim]


@dataclass
class LMState:
    """One conversation's side of the model: the ids it holds, their KV cache, and the
    logits for the next position."""

    ids: list[int] = field(default_factory=list)
    kv: KV | None = None
    logits: torch.Tensor | None = None  # [V]: distribution of ids[len(ids)]

    @property
    def length(self) -> int:
        return len(self.ids)


def _cache(kv: KV | None):
    from transformers import DynamicCache

    return DynamicCache() if kv is None else DynamicCache(ddp_cache_data=kv)


def _kv_of(cache) -> KV:
    return [(k, v) for k, v, *_ in cache]


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept either."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class SpeechEngine:
    """The model side of generation. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model,
        layout: Layout,
        text: Sampling,
        audio: Sampling,
        max_context: int,
        prefill_chunk: int = 512,
        seed: int | None = None,
    ):
        self.model = model
        self.layout = layout
        self.text, self.audio = text, audio
        self.device = next(model.parameters()).device
        window = getattr(model.config, "sliding_window", None) or 1 << 30
        limit = min(window - 1, getattr(model.config, "max_position_embeddings", 1 << 30))
        # a plain (non-sliding) cache is exact while the context stays inside the window
        self.max_context = max(1 + 4 * layout.group_len, min(max_context, limit))
        self.prefill_chunk = prefill_chunk
        self._cache_kw = cache_kwarg(model)
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.masks = torch.stack([layout.allowed_mask(i) for i in range(layout.group_len + 1)]).to(
            self.device
        )

    # -- context -----------------------------------------------------------------------
    def new_state(self) -> LMState:
        st = LMState()
        self.append(st, [self.layout.vocab.bos])
        return st

    def _mask(self, index: int) -> torch.Tensor:
        return self.masks[0 if index == 0 else 1 + (index - 1) % self.layout.group_len]

    @property
    def room(self) -> int:
        """The most ids one ``append`` takes: whole groups filling the context that
        ``_make_room`` rebuilds, after ``<bos>``."""
        g = self.layout.group_len
        return (self.max_context * 3 // 4 - 1) // g * g

    @torch.inference_mode()
    def append(self, st: LMState, ids: list[int]) -> int:
        """Prefill ``ids`` after what ``st`` holds (chunked, so a long prefill is several
        bounded forward passes); returns how many were dropped unheard.

        The context never exceeds ``max_context``, however much arrives at once: audio far
        faster than real time loses its oldest whole groups here, before any forward pass,
        exactly as if it had come in pieces and ``_make_room`` had dropped them. The oldest
        go because a speech LM answers what was said last, and because the window is rebuilt
        from ``<bos>`` (positions start again at 0), the KV cache holds at most
        ``max_context`` positions and the model never sees positions it was not trained on.
        """
        if not ids:
            return 0
        g = self.layout.group_len
        dropped = -(-(len(ids) - self.room) // g) * g if len(ids) > self.room else 0
        ids = ids[dropped:]
        self._make_room(st, len(ids))
        for i in range(0, len(ids), self.prefill_chunk):
            self._forward_one(st, ids[i : i + self.prefill_chunk])
        return dropped

    def _forward_one(self, st: LMState, ids: list[int]) -> None:
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(st.length, st.length + len(ids), device=self.device)[None]
        cache = _cache(st.kv)
        out = self.model(
            input_ids=x,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        st.kv, st.logits = _kv_of(cache), out.logits[0, -1]
        st.ids.extend(ids)

    def _make_room(self, st: LMState, extra: int) -> None:
        """Keep the context under ``max_context``: drop the oldest whole groups (keeping
        ``<bos>``) and prefill the rest again. Rare, and cheaper than a sliding cache."""
        if st.length + extra <= self.max_context:
            return
        g = self.layout.group_len
        keep_groups = max(0, (self.max_context * 3 // 4 - extra) // g)
        body = st.ids[1:]
        tail = body[len(body) - keep_groups * g :] if keep_groups else []
        st.ids, st.kv, st.logits = [], None, None
        self._forward_one(st, [self.layout.vocab.bos] + tail)

    def crop(self, st: LMState, length: int) -> None:
        """Forget everything after the first ``length`` ids (an interrupted turn)."""
        if length >= st.length:
            return
        if length < 1:
            raise ValueError("cannot crop <bos>")
        st.ids = st.ids[:length]
        st.kv = [(k[:, :, : length - 1].clone(), v[:, :, : length - 1].clone()) for k, v in st.kv]
        # logits of position `length` are those after feeding ids[length-1]: recompute
        last = st.ids.pop()
        self._forward_one(st, [last])

    # -- generation --------------------------------------------------------------------
    @property
    def given_per_group(self) -> int:
        """How many ids of a group are given, not sampled (the user's frames, 2 streams)."""
        return sum(not slot.sampled for slot in self.layout.slots)

    @torch.inference_mode()
    def generate_group(
        self, states: list[LMState], given: list[list[int]] | None = None
    ) -> list[list[int]]:
        """One whole group for each conversation, batched: its sampled slots (text, the
        model's audio) are drawn, its input slots (the user's frames of a 2-stream layout)
        take ``given[b]``, in slot order, fed in one forward pass per run of them. Returns
        each conversation's whole group, given ids included."""
        g, n_given = self.layout.group_len, self.given_per_group
        given = given if given is not None else [[] for _ in states]
        if len(given) != len(states) or any(len(ids) != n_given for ids in given):
            raise ValueError(f"each conversation needs {n_given} given ids per group")
        for st in states:
            if (st.length - 1) % g:
                raise ValueError("a conversation must hold whole groups before generating")
            self._make_room(st, g)
        given_ids = np.asarray(given, dtype=np.int64).reshape(len(states), n_given)
        return self._group(states, torch.as_tensor(given_ids, device=self.device))

    def _sampling_for(self, index: int) -> Sampling:
        slot = self.layout.slot_at(index)
        return self.text if slot is not None and slot.kind == "text" else self.audio

    @cached_property
    def _runs(self) -> list[tuple[bool, int]]:
        """A group as runs of (sampled?, length): sampled slots go one id per forward pass,
        a run of given ones in one."""
        runs: list[tuple[bool, int]] = []
        for slot in self.layout.slots:
            if runs and runs[-1][0] == slot.sampled:
                runs[-1] = (slot.sampled, runs[-1][1] + 1)
            else:
                runs.append((slot.sampled, 1))
        return runs

    def _group(self, states: list[LMState], given: torch.Tensor) -> list[list[int]]:
        """``states`` left-padded to one length and stacked (positions stay each one's own,
        the padding masked out); one row alone needs neither copy nor mask."""
        lengths = [st.length for st in states]  # ids held == KV rows held
        longest = max(lengths)
        pads = [longest - n for n in lengths]
        cache = _cache(states[0].kv if len(states) == 1 else _stacked(states, pads))
        mask = None
        if any(pads):
            mask = torch.ones(len(states), longest, dtype=torch.long, device=self.device)
            for b, pad in enumerate(pads):
                mask[b, :pad] = 0
        logits = torch.stack([st.logits for st in states])
        pos = torch.tensor(lengths, device=self.device)[:, None]
        index = lengths[0]  # same slot for every row (whole groups)
        out, fed = [], 0
        for sampled, n in self._runs:
            for _ in range(n if sampled else 1):
                if sampled:
                    tok = sample_tokens(
                        logits, self._mask(index), self._sampling_for(index), self.generator
                    )[:, None]
                else:
                    tok, fed = given[:, fed : fed + n], fed + n
                width = tok.shape[1]
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(len(states), width)], dim=1)
                o = self.model(
                    input_ids=tok,
                    position_ids=pos + torch.arange(width, device=self.device),
                    attention_mask=mask,
                    **{self._cache_kw: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
                logits = o.logits[:, -1]
                out.append(tok)
                pos, index = pos + width, index + width
        ids = torch.cat(out, dim=1).tolist()
        for b, (st, pad) in enumerate(zip(states, pads, strict=True)):
            if len(states) == 1:
                st.kv = _kv_of(cache)
            else:
                st.kv = [
                    (k[b : b + 1, :, pad:].clone(), v[b : b + 1, :, pad:].clone())
                    for k, v, *_ in cache
                ]
            st.logits = logits[b]
            st.ids.extend(ids[b])
        return ids


def _stacked(states: list[LMState], pads: list[int]) -> KV:
    """The conversations' caches, each left-padded by its ``pad`` zero rows (masked out),
    stacked into one batch."""

    def padded(x: torch.Tensor, pad: int) -> torch.Tensor:
        z = x.new_zeros(x.shape[0], x.shape[1], pad, x.shape[3])
        return torch.cat([z, x], dim=2) if pad else x

    return [
        tuple(
            torch.cat([padded(st.kv[layer][i], p) for st, p in zip(states, pads, strict=True)])
            for i in (0, 1)
        )
        for layer in range(len(states[0].kv))
    ]


class TextStream:
    """Text ids of a turn → new UTF-8 pieces as they become printable (a byte-level BPE
    token can be half a character; such a piece waits for the rest). Bytes that never
    become a character and control characters are left out of what is sent.

    Each push decodes a bounded window: the ids not yet sent plus the last ``keep`` ids as
    context (a SentencePiece word's leading space, a character's first bytes). A full-duplex
    conversation is one "turn" as long as the connection, so decoding everything it said on
    every group would grow without bound, in memory and in time."""

    def __init__(self, tokenizer, keep: int = 16):
        self.tokenizer = tokenizer
        self.keep = keep
        self.ids: list[int] = []  # the window: context, then ids not yet sent
        self.sent = ""  # the window's text that was sent

    def push(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        if len(self.ids) > 4 * self.keep:  # all sent: slide the window to the last `keep`
            self.ids = self.ids[-self.keep :]
            self.sent = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "".join(ch for ch in piece if ch in "\n\t" or (ch.isprintable() and ch != "\ufffd"))
