"""The process group of a training worker: DeepSpeed on the group Ray Train made, and the
all-reduces the loop needs (no-ops outside a process group, so unit tests run without one)."""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) over ranks in place; a no-op outside a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t, dist.ReduceOp.MAX)


def init_deepspeed_distributed(use_gpu: bool) -> None:
    """``deepspeed.init_distributed`` on the process group Ray Train made (nccl / gloo).

    On CPU, DeepSpeed would JIT-compile its shared-memory allreduce op here; its build key
    includes the interpreter's path, which Ray's per-session working-dir copy changes, so
    every session would recompile it (minutes on a small node), for an allreduce that gloo
    already does. DeepSpeed (0.19) has no switch for it, so its builder is replaced by one
    that builds nothing for this call only (its backend reads it once, when constructed);
    collectives go through torch.distributed.
    """
    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the attribute is torch)
    build_shm_op = ds_torch.build_shm_op
    if not use_gpu:
        ds_torch.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    finally:
        ds_torch.build_shm_op = build_shm_op
