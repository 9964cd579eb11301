"""A listening check for a trained model: continue a held-out prompt, constrained to the
layout, and decode the audio.

Ids are drawn by :func:`voxtral.sampling.sample_tokens`, the server's sampler: each position
only emits ids of its slot's kind, so any model, even a random one, yields a well-formed
stream, and the sample sounds the way the served model would.
"""

from __future__ import annotations

import numpy as np
import torch

from voxtral.sampling import Sampling, sample_tokens
from voxtral.tokenizer import Layout


@torch.no_grad()
def generate_ids(
    model,
    layout: Layout,
    prompt: np.ndarray,
    new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 250,
    seed: int = 0,
) -> np.ndarray:
    """Continue ``prompt`` (a stream starting at ``<bos>``) by ``new_tokens`` ids, with a KV
    cache; returns only the new ids. Sampling runs on the CPU with a generator seeded by
    ``seed``, so the ids do not depend on the device the model is on."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    settings = Sampling(temperature=temperature, top_k=top_k)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor(np.array(prompt, dtype=np.int64), device=device)[None]
    cache = DynamicCache()
    out: list[int] = []
    step_input = ids
    for i in range(new_tokens):
        res = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
        logits = res.logits[0, -1].float().cpu()
        pos = ids.shape[1] + i
        allowed = layout.allowed_mask(pos)[: logits.shape[0]]
        nxt = int(sample_tokens(logits, allowed, settings, g))
        out.append(nxt)
        step_input = torch.tensor([[nxt]], device=device)
    return np.asarray(out, dtype=np.int64)


def prompt_from_window(layout: Layout, window: np.ndarray, seconds: float) -> np.ndarray:
    """The first ``seconds`` (whole groups, at least one) of a stream, ``<bos>`` included."""
    groups = max(1, round(seconds / layout.group_s))
    groups = min(groups, (len(window) - 1) // layout.group_len)
    return np.asarray(window[: layout.seq_len_for_groups(groups)], dtype=np.int64)


def tokens_for_seconds(layout: Layout, seconds: float) -> int:
    """How many ids ``seconds`` of stream take: whole groups, at least one."""
    return max(1, round(seconds / layout.group_s)) * layout.group_len
