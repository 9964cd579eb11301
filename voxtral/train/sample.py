"""A listening check for a trained model: continue a held-out prompt, constrained to the
layout, and decode the audio.

Sampling is masked so each position only emits ids of its slot's kind (the same rule the
server applies), so any model, even a random one, yields a well-formed stream.
"""

from __future__ import annotations

import numpy as np
import torch

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
    cache; returns only the new ids."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor(np.array(prompt, dtype=np.int64), device=device)[None]
    cache = DynamicCache()
    out: list[int] = []
    step_input = ids
    for i in range(new_tokens):
        res = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
        logits = res.logits[0, -1].float().cpu()
        pos = ids.shape[1] + i
        logits = logits.masked_fill(~layout.allowed_mask(pos)[: logits.shape[0]], -torch.inf)
        nxt = sample_logits(logits, temperature, top_k, g)
        out.append(nxt)
        step_input = torch.tensor([[nxt]], device=device)
    return np.asarray(out, dtype=np.int64)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, g: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))


def prompt_from_window(layout: Layout, window: np.ndarray, seconds: float) -> np.ndarray:
    """The first ``seconds`` (whole groups, at least one) of a stream, ``<bos>`` included."""
    groups = max(1, round(seconds / layout.group_s))
    groups = min(groups, (len(window) - 1) // layout.group_len)
    return np.asarray(window[: layout.seq_len_for_groups(groups)], dtype=np.int64)


def tokens_for_seconds(layout: Layout, seconds: float) -> int:
    return max(1, round(seconds / layout.group_s)) * layout.group_len
