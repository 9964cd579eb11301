"""Streaming generation with a KV cache, batched across conversations.

Every conversation keeps its own KV cache (a list of per-layer key/value tensors) and the
ids it holds, so it can be cropped back to "what the listener actually heard" after an
interrupt, rebuilt when it outgrows the context, or dropped the moment its client leaves.
To step many conversations at once, their caches are left-padded to a common length and
stacked; positions stay each conversation's own, and the padding is masked out. Streams are
always whole groups long, so every row of a batch is at the same slot of its group and one
allowed-token mask and one set of sampling settings serve the whole step. The sampling math
itself lives in :mod:`voxtral.sampling` (shared with the training sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from voxtral.sampling import Sampling, sample_tokens
from voxtral.tokenizer import Layout

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
    @torch.inference_mode()
    def generate_group(self, states: list[LMState]) -> list[list[int]]:
        """One whole group (text slot + audio frames) for each conversation, batched."""
        g = self.layout.group_len
        for st in states:
            if (st.length - 1) % g:
                raise ValueError("a conversation must hold whole groups before generating")
            self._make_room(st, g)
        if len(states) == 1:
            return [self._group_single(states[0])]
        return self._group_batched(states)

    def _sampling_for(self, index: int) -> Sampling:
        slot = self.layout.slot_at(index)
        return self.text if slot is not None and slot.kind == "text" else self.audio

    def _group_single(self, st: LMState) -> list[int]:
        out = []
        cache = _cache(st.kv)
        for _ in range(self.layout.group_len):
            index = st.length
            tok = sample_tokens(
                st.logits[None], self._mask(index), self._sampling_for(index), self.generator
            )
            o = self.model(
                input_ids=tok[:, None],
                position_ids=torch.tensor([[index]], device=self.device),
                **{self._cache_kw: cache},
                use_cache=True,
                logits_to_keep=1,
            )
            st.logits = o.logits[0, -1]
            st.ids.append(int(tok))
            out.append(int(tok))
        st.kv = _kv_of(cache)
        return out

    def _group_batched(self, states: list[LMState]) -> list[list[int]]:
        lengths = [st.length for st in states]  # ids held == KV rows held
        longest = max(lengths)
        pads = [longest - n for n in lengths]
        kv = []
        for layer in range(len(states[0].kv)):
            ks, vs = [], []
            for st, pad in zip(states, pads, strict=True):
                k, v = st.kv[layer]
                if pad:
                    z = k.new_zeros(k.shape[0], k.shape[1], pad, k.shape[3])
                    k, v = torch.cat([z, k], dim=2), torch.cat([z, v], dim=2)
                ks.append(k)
                vs.append(v)
            kv.append((torch.cat(ks), torch.cat(vs)))
        cache = _cache(kv)
        mask = torch.ones(len(states), longest, dtype=torch.long, device=self.device)
        for b, pad in enumerate(pads):
            mask[b, :pad] = 0
        logits = torch.stack([st.logits for st in states])
        pos = torch.tensor(lengths, device=self.device)
        index = lengths[0]  # same slot for every row (whole groups)
        out: list[list[int]] = [[] for _ in states]
        for _ in range(self.layout.group_len):
            tok = sample_tokens(
                logits, self._mask(index), self._sampling_for(index), self.generator
            )
            mask = torch.cat([mask, mask.new_ones(len(states), 1)], dim=1)
            o = self.model(
                input_ids=tok[:, None],
                position_ids=pos[:, None],
                attention_mask=mask,
                **{self._cache_kw: cache},
                use_cache=True,
                logits_to_keep=1,
            )
            logits = o.logits[:, -1]
            for b, t in enumerate(tok.tolist()):
                out[b].append(t)
            pos = pos + 1
            index += 1
        for b, (st, pad) in enumerate(zip(states, pads, strict=True)):
            st.kv = [
                (k[b : b + 1, :, pad:].clone(), v[b : b + 1, :, pad:].clone()) for k, v, *_ in cache
            ]
            st.logits = logits[b]
            st.ids.extend(out[b])
        return out


class TextStream:
    """Text ids of a turn → new UTF-8 pieces as they become printable (a byte-level BPE
    token can be half a character; such a piece waits for the rest). Bytes that never
    become a character and control characters are left out of what is sent."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return "".join(ch for ch in piece if ch in "\n\t" or (ch.isprintable() and ch != "\ufffd"))
