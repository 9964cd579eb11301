"""Weighted next-token cross-entropy over the streams, and its metrics.

Each target's cross-entropy is weighted by its stream (text, ``<text_pad>``, first codebook,
other codebooks, the user's audio): padding slots are most of the text stream and trivially
predictable, so at full weight they would drown the words; the first codebook carries most
of the content and later ones refine it; the user's audio (two streams) is what the model
listens to, not what it says, so by default it has weight 0: its cross-entropy is still
measured and reported, but it sends no gradient. The loss is the weighted mean,
``Σ w·ce / Σ w``, so changing a weight changes the balance between streams and not the
scale of the gradients.

Per-stream sums (weight-free CE and counts) come back as one small tensor, so metrics
across micro-batches and workers add up with a single all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from voxtral.config import TrainConfig
from voxtral.stages.train.data import IGNORE, STREAMS


def stream_weights(cfg: TrainConfig) -> torch.Tensor:
    """Weights in :data:`voxtral.stages.train.data.STREAMS` order."""
    return torch.tensor(
        [
            cfg.loss_weight_text,
            cfg.loss_weight_text_pad,
            cfg.loss_weight_audio_q0,
            cfg.loss_weight_audio_rest,
            cfg.loss_weight_user_audio,
        ],
        dtype=torch.float32,
    )


def stream_loss(
    logits: torch.Tensor, labels: torch.Tensor, streams: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean CE and per-stream stats ``[3, n_streams]`` (Σ ce, count, Σ w·ce).

    ``logits`` ``[B, T, V]``; ``labels`` ``[B, T]`` already shifted (``IGNORE`` = untrained);
    ``streams`` ``[B, T]`` (-1 = untrained). CE is computed in fp32 whatever the logits are.
    A batch with nothing to train gives a zero loss that still reaches every parameter, so
    ZeRO's gradient hooks fire on every worker.
    """
    n = len(STREAMS)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    st = streams.reshape(-1).long()
    valid = (lab != IGNORE) & (st >= 0)
    ce = F.cross_entropy(flat, lab.clamp_min(0), reduction="none") * valid
    idx = st.clamp_min(0)
    w = weights.to(flat.device)[idx] * valid
    denom = w.sum()
    loss = (w * ce).sum() / denom.clamp_min(1e-8)
    stats = torch.zeros(3, n, device=flat.device, dtype=torch.float32)
    with torch.no_grad():
        stats[0].index_add_(0, idx, ce.detach())
        stats[1].index_add_(0, idx, valid.float())
        stats[2].index_add_(0, idx, (w * ce).detach())
    return loss, stats


def stats_metrics(stats: torch.Tensor, weights: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Summed stats → ``{prefix}loss`` (weighted mean) and ``{prefix}loss_<stream>``."""
    s = stats.detach().double().cpu()
    w = weights.double().cpu()
    out: dict[str, float] = {}
    for i, name in enumerate(STREAMS):
        out[f"{prefix}loss_{name}"] = float(s[0, i] / s[1, i]) if s[1, i] > 0 else math.nan
    wsum = float((w * s[1]).sum())
    out[f"{prefix}loss"] = float(s[2].sum()) / wsum if wsum > 0 else math.nan
    out[f"{prefix}tokens"] = float(s[1].sum())
    return out
