"""How the weights are updated: the DeepSpeed (ZeRO) config, the optimizer and the learning
rate schedule that the train section stands for.

Pure functions of :class:`voxtral.config.TrainConfig`, so what a run did can be read off
its config. Precision: bf16 compute with fp32 master weights and optimizer state on GPU
(DeepSpeed's ZeRO optimizer keeps the fp32 partitions); plain fp32 on CPU, where bf16
matmuls are slow and gain nothing. The optimizer is torch's AdamW (fused on GPU), so no
DeepSpeed op is compiled at start-up; only optimizer offload needs DeepSpeed's CPU Adam
(its ZeRO-Offload path refuses others), which is compiled once into ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import math

import torch

from voxtral.config import TrainConfig

QUIET_STEPS = 10**9  # DeepSpeed's own step logging, off: the loop reports metrics


def deepspeed_config(cfg: TrainConfig, world_size: int, use_gpu: bool) -> dict:
    """The ``deepspeed.initialize`` config dict for ``world_size`` workers."""
    zero: dict = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": use_gpu,
        "reduce_scatter": True,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.zero_stage == 3:
        # Export consolidates the fp32 shards from the checkpoint instead.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    out: dict = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # A step whose gradients hold NaN/inf is skipped (no update) rather than applied:
        # asked for explicitly on bf16; fp32 ZeRO-2/3 skip on a non-finite gradient norm.
        "bf16": {"enabled": use_gpu, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        out["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.adam_betas),
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
            },
        }
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms and biases (1-D) are left undecayed."""
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:  # ZeRO-3 partitions are flat: the real shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else keep).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, use_gpu: bool):
    """Torch AdamW for ``deepspeed.initialize``, or None when DeepSpeed builds its CPU Adam
    from the config (optimizer offload)."""
    if cfg.offload_optimizer:
        return None
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        eps=1e-8,
        fused=use_gpu,
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps``, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable schedule for ``LambdaLR`` (its state is just the step DeepSpeed saves)."""

    def __init__(self, cfg: TrainConfig):
        self.warmup, self.max_steps, self.min_ratio = (
            cfg.warmup_steps,
            cfg.max_steps,
            cfg.min_lr_ratio,
        )

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.max_steps, self.min_ratio)


def build_lr_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup-cosine schedule on ``optimizer`` (DeepSpeed steps it with the optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg))
