"""Choosing the next id from a model's logits: temperature, top-k and top-p under a mask.

One home for the sampling math, used by the listening sample at the end of training
(:mod:`voxtral.stages.train.sample`) and by the server (:mod:`voxtral.generation`), so a sample
written at export time is drawn the way the server would draw it.

The mask comes first: a position of the multimodal stream may only hold ids of its slot's
kind (a text id in the text slot, codebook ``q``'s ids in its audio slot; see
:meth:`voxtral.layout.Layout.allowed_mask`). Applying top-k and top-p after it makes them
choose among the ids that can actually appear, so any model, even a random one, yields a
well-formed stream. Pure torch, no Ray: the caller owns the device and the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Settings for one kind of slot. The defaults change nothing: plain softmax sampling."""

    temperature: float = 1.0  # <= 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely ids; 0 = off
    top_p: float = 1.0  # keep the smallest set of ids whose probability reaches p; 1 = off


def filter_logits(logits: torch.Tensor, allowed: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Float logits scaled by the temperature, with ``-inf`` wherever an id may not be drawn:
    outside ``allowed``, below the ``top_k``-th logit, or past the ``top_p`` mass.

    ``logits`` is ``[V]`` or ``[B, V]``; ``allowed`` is a boolean ``[V]`` (one slot for the
    whole batch) or ``[B, V]``. Deterministic, so the tests can check which ids survive; at
    temperature <= 0 only the mask is applied (greedy needs nothing else).
    """
    x = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
    if s.temperature <= 0:
        return x
    x = x / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th id all stay
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop an id when the ids ranked above it already cover top_p (the first one stays)
        drop = (probs.cumsum(dim=-1) - probs) > s.top_p
        drop[..., 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def sample_tokens(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    s: Sampling,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, V]`` logits → ``[B]`` ids (``[V]`` → a 0-d id), only ever among ``allowed``.

    Temperature <= 0 is greedy and draws nothing from ``generator``; otherwise one draw per
    row, so a seeded generator on the logits' device makes the ids reproducible.
    """
    x = filter_logits(logits, allowed, s)
    if s.temperature <= 0:
        return x.argmax(dim=-1)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
