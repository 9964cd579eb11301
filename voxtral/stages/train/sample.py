"""A listening check for a trained model: continue a held-out prompt, constrained to the
layout, and decode the audio.

Ids are drawn by :func:`voxtral.sampling.sample_tokens`, the server's sampler: each position
only emits ids of its slot's kind, so any model, even a random one, yields a well-formed
stream, and the sample sounds the way the served model would.

With two streams only the model's slots (text and its audio, ``Layout.is_sampled``) are
drawn; the user's slots are *given*, as a microphone would give them at serving time: the
sample replays a held-out chunk's user track past the prompt (then silence), so the model is
heard answering a real conversation partner.
"""

from __future__ import annotations

import numpy as np
import torch

from voxtral.layout import Layout
from voxtral.sampling import Sampling, sample_tokens


@torch.no_grad()
def generate_ids(
    model,
    layout: Layout,
    prompt: np.ndarray,
    new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 250,
    seed: int = 0,
    given: np.ndarray | None = None,
) -> np.ndarray:
    """Continue ``prompt`` (a stream starting at ``<bos>``) by ``new_tokens`` ids, with a KV
    cache; returns only the new ids. Sampling runs on the CPU with a generator seeded by
    ``seed``, so the ids do not depend on the device the model is on.

    ``given[i]`` is the id of new position ``i`` where the layout does not sample (the user's
    slots of a 2-stream layout, see :func:`user_continuation`); a 1-stream layout samples
    every position and needs none."""
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
        if layout.is_sampled(pos):
            allowed = layout.allowed_mask(pos)[: logits.shape[0]]
            nxt = int(sample_tokens(logits, allowed, settings, g))
        elif given is not None and i < len(given) and given[i] >= 0:
            nxt = int(given[i])
        else:
            raise ValueError(f"position {pos} is not sampled and no id is given for it")
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


def user_continuation(
    layout: Layout, stream: np.ndarray, start: int, new_tokens: int, silence: np.ndarray
) -> np.ndarray:
    """The ``given`` ids of :func:`generate_ids` for positions ``start …``: the user's slots
    taken from ``stream`` (a chunk's whole 2-stream id stream) while it lasts, then the
    ``silence`` frame (``[n_q]`` codes); -1 at the positions the model samples."""
    v = layout.vocab
    out = np.full(new_tokens, -1, dtype=np.int64)
    for i in range(new_tokens):
        pos = start + i
        slot = layout.slot_at(pos)
        if slot is None or slot.sampled:
            continue
        if pos < len(stream):
            out[i] = int(stream[pos])
        else:
            out[i] = v.audio_range(slot.q)[0] + int(silence[slot.q])
    return out
