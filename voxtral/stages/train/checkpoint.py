"""Checkpoints and collectives of a training worker: what one checkpoint folder holds, how a
rank writes and restores its part, and the all-reduces the loop needs.

A checkpoint folder holds, per rank, its DeepSpeed shard (on ZeRO-2, rank 0 also the module)
and ``data_rank<r>.json`` (its data position); rank 0 adds ``train_state.json`` (tag, step,
world size, metrics). Ray merges the ranks' folders into one (they report the same
``checkpoint_dir_name``). A checkpoint is written only when every weight is finite
(:func:`weights_finite`), so the latest one always holds good weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from voxtral.stages.train.dist import all_max
from voxtral.stages.train.stream import Position

TRAIN_STATE = "train_state.json"


def data_state_name(rank: int) -> str:
    return f"data_rank{rank}.json"


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def weights_finite(engine, device) -> bool:
    """Whether every weight on every rank is finite (ZeRO-3: each rank checks its partition)."""
    bad = 0
    with torch.no_grad():
        for p in engine.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps the rank's shard there
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = 1
                break
    flag = all_max(torch.tensor([bad], device=device))
    return int(flag.item()) == 0


def restore(engine, folder: str, rank: int, world: int) -> tuple[int, Position]:
    state = json.loads(Path(folder, TRAIN_STATE).read_text())
    if state["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {folder} was written by {state['world_size']} workers, this run has "
            f"{world}: ZeRO shards resume only on the same train.num_workers"
        )
    path, _ = engine.load_checkpoint(
        folder, tag=state["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {state['tag']} from {folder}")
    data = json.loads(Path(folder, data_state_name(rank)).read_text())
    return int(state["step"]), Position(int(data["epoch"]), int(data["rows"]))


def save(engine, step: int, position: Position, rank: int, world: int, extra: dict) -> str:
    folder = tempfile.mkdtemp(prefix=f"voxtral-ckpt-r{rank}-")
    tag = checkpoint_tag(step)
    engine.save_checkpoint(folder, tag=tag, client_state={"step": step}, save_latest=False)
    Path(folder, data_state_name(rank)).write_text(json.dumps(vars(position)))
    if rank == 0:
        state = {"tag": tag, "step": step, "world_size": world, **extra}
        Path(folder, TRAIN_STATE).write_text(json.dumps(state, indent=2))
    return folder
