"""The per-worker training function that Ray Train runs on every worker.

Ray only at the edges: the Ray Train context, the dataset shards, ``ray.train.report``
and checkpoints; the math lives in :mod:`voxtral.stages.train.loss`, the data in
:mod:`voxtral.stages.train.data` / :mod:`voxtral.stages.train.stream`.

Checkpoints: each rank saves its DeepSpeed shard (and, on ZeRO-2, rank 0 the module) into
its own local folder plus ``data_rank<r>.json`` (its data position); rank 0 adds
``train_state.json`` (the tag and step). All ranks report the same ``checkpoint_dir_name``,
so Ray merges them into one folder in storage: one checkpoint holds every shard. On a
restart (worker lost, or the same run name rerun) ``ray.train.get_checkpoint()`` returns
it and model, optimizer, LR schedule and data position come back.

Non-finite steps: a step whose loss or gradient is NaN/inf on any rank is skipped by
DeepSpeed's overflow check on every rank (see :func:`_poison_if_nonfinite`), counted, and
kept out of the reported loss; ``train.max_nonfinite_steps`` of them in a row stop the run
with :class:`NonFiniteTraining`. A checkpoint is written only when every weight is finite,
so the latest checkpoint in storage always holds good weights.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from voxtral.config import Config
from voxtral.layout import Layout
from voxtral.metrics import Metric, Metrics
from voxtral.model import build_speech_lm
from voxtral.stages.train.attention import packed_kwargs, use_attention
from voxtral.stages.train.checkpoint import checkpoint_tag, restore, save, weights_finite
from voxtral.stages.train.data import MODEL_AUDIO, Packed, collate, empty_like_batch
from voxtral.stages.train.dist import all_max, all_reduce, init_deepspeed_distributed
from voxtral.stages.train.loss import stats_metrics, stream_loss, stream_weights
from voxtral.stages.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    deepspeed_config,
    param_groups,
)
from voxtral.stages.train.perf import (
    flops_per_token,
    local_param_count,
    matmul_params,
    mfu,
    param_count,
    peak_flops,
)
from voxtral.stages.train.stream import Position, TrainStream, eval_rows

log = logging.getLogger("voxtral.stages.train")


class NonFiniteTraining(RuntimeError):
    """Training produced non-finite losses or weights and cannot go on safely."""


def _to_device(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict[str, torch.Tensor], weights: torch.Tensor):
    """Weighted loss and per-stream stats of one micro-batch (a hook point for tests)."""
    out = engine(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=None,  # packed windows: the mask comes from the position resets
        use_cache=False,
        **packed_kwargs(engine.module, batch["position_ids"]),  # flash-attn: the windows
    )
    return stream_loss(out.logits, batch["labels"], batch["streams"], weights)


def _evaluate(
    engine, rows: list[Packed], micro_batch: int, seq_len: int, pad_id: int, weights, device
) -> torch.Tensor:
    """Summed per-stream stats over this rank's held-out rows. Every rank runs as many
    forwards as the rank with most (ZeRO-3 gathers parameters collectively), padding with
    batches that train nothing."""
    batches = [collate(rows[i : i + micro_batch]) for i in range(0, len(rows), micro_batch)]
    batches = [b for b in batches if len(b["input_ids"]) == micro_batch]
    n = all_max(torch.tensor([len(batches)], device=device))
    blank = empty_like_batch(
        collate(
            [
                Packed(
                    np.full(seq_len, pad_id),
                    np.arange(seq_len),
                    np.zeros(seq_len, np.int64),
                    np.zeros(seq_len, np.int8),
                    0,
                )
            ]
            * micro_batch
        )
    )
    total = torch.zeros(3, len(weights), device=device)
    engine.eval()
    try:
        with torch.no_grad():
            for i in range(int(n.item())):
                b = batches[i] if i < len(batches) else blank
                _, stats = _forward(engine, _to_device(b, device), weights)
                total += stats
    finally:  # back to training mode (dropout, gradient checkpointing) whatever happened
        engine.train()
    return all_reduce(total)


def _poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, or, when it is NaN/inf, ``loss * NaN``: every gradient it reaches is then
    NaN, so DeepSpeed's overflow check skips the optimizer step. That check sees the global
    gradient norm (reduced over ranks), so one rank's bad loss skips the step on all of them,
    on ZeRO-2 and -3, in fp32 and bf16. Without this, a NaN added to a loss as a constant
    would leave the gradients finite and the step would go on. No host sync: the factor is
    chosen on the device."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)


def _train_step(
    engine, stream: TrainStream, grad_accum: int, weights: torch.Tensor, device
) -> torch.Tensor | None:
    """One optimizer step over ``grad_accum`` micro-batches; the summed per-stream stats, or
    None when DeepSpeed skipped the update (a non-finite loss or gradient on some rank)."""
    stats_sum = torch.zeros(3, len(weights), device=device)
    for _ in range(grad_accum):
        batch = _to_device(stream.next_batch(), device)
        loss, stats = _forward(engine, batch, weights)
        engine.backward(_poison_if_nonfinite(loss))
        engine.step()
        stats_sum += stats
    return stats_sum if engine.was_step_applied() else None


METRICS = Metrics(
    tokens=Metric("counter", "voxtral_train_tokens", "Tokens trained on (targets)."),
    audio_s=Metric("counter", "voxtral_train_audio_seconds", "Seconds of audio trained on."),
    tokens_per_s=Metric("gauge", "voxtral_train_tokens_per_s", "Tokens/s, all workers."),
    loss=Metric("gauge", "voxtral_train_loss", "Weighted training loss."),
    eval_loss=Metric("gauge", "voxtral_train_eval_loss", "Weighted held-out loss."),
    mfu=Metric("gauge", "voxtral_train_mfu", "Model FLOPs utilisation of a GPU."),
)


@dataclass
class Worker:
    """What one training worker holds for the whole run."""

    cfg: Config
    engine: Any  # deepspeed.DeepSpeedEngine
    layout: Layout
    device: torch.device
    rank: int
    world: int
    weights: torch.Tensor  # loss weight per stream
    flops_per_token: float
    peak_flops: float | None  # GPU only: for MFU
    built_fraction: float  # the share of the weights this rank holds once built

    @property
    def audio_per_s(self) -> float:
        """Audio tokens per second of audio."""
        return self.layout.vocab.n_q * self.layout.frame_rate


def start_worker(config: dict) -> Worker:
    """Process group, model, DeepSpeed engine: the same on every rank."""
    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if tc.use_gpu else "cpu")  # before import
    import deepspeed
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    if tc.use_gpu:
        torch.cuda.set_device(device)
    init_deepspeed_distributed(tc.use_gpu)
    torch.manual_seed(tc.seed)

    # bf16 on GPU: ZeRO keeps the fp32 master copy; loading in bf16 halves host memory.
    # ZeRO-3 partitions the weights while they load (see build_speech_lm).
    ds_config = deepspeed_config(tc, world, tc.use_gpu)
    model, _tokenizer, layout = build_speech_lm(
        cfg, dtype=torch.bfloat16 if tc.use_gpu else torch.float32, ds_config=ds_config
    )
    expected = Layout.from_dict(config["layout"])
    if layout != expected:
        raise RuntimeError(f"worker layout {layout} differs from the driver's {expected}")
    built_fraction = local_param_count(model) / param_count(model)
    model.config.use_cache = False
    kernel = use_attention(model, tc.attention, device.type)
    log.info("attention: %s (train.attention=%s)", kernel, tc.attention)
    flops_tok = flops_per_token(model.config, matmul_params(model), tc.seq_len)
    if tc.use_gpu and tc.zero_stage == 3:  # the partitions sit on the device already
        for buf in model.buffers():
            buf.data = buf.data.to(device)
    elif tc.use_gpu:
        model.to(device)
    optimizer = build_optimizer(model, tc, tc.use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=param_groups(model, tc.weight_decay) if optimizer is None else None,
        lr_scheduler=partial(build_lr_scheduler, cfg=tc),
        config=ds_config,
    )
    if tc.compile:
        engine.compile()
    engine.train()  # from_pretrained returns eval mode: no dropout, no checkpointing
    peak = peak_flops(torch.cuda.get_device_name(device), tc.peak_tflops) if tc.use_gpu else None
    return Worker(
        cfg, engine, layout, device, rank, world, stream_weights(tc).to(device), flops_tok,
        peak, built_fraction,
    )  # fmt: skip


def window_metrics(w: Worker, acc: torch.Tensor, elapsed: float, steps: int) -> dict[str, Any]:
    """Figures of the steps since the last report: ``acc`` is this rank's summed per-stream
    stats (see :func:`voxtral.stages.train.loss.stream_loss`); reduced over ranks here."""
    local_tokens = float(acc[1].sum())
    total = all_reduce(acc.clone())
    audio = list(MODEL_AUDIO)  # each second once, not again as the user's track
    audio_tokens = float(total[1, audio].sum())
    metrics = {
        **stats_metrics(total, w.weights),
        "built_param_fraction": w.built_fraction,
        "nonfinite_steps": int(w.engine.skipped_steps),  # run total (kept in checkpoints)
        "step_time_s": elapsed / steps,
        "window_s": elapsed,
        "audio_s": audio_tokens / w.audio_per_s,
        "local_audio_s": float(acc[1, audio].sum()) / w.audio_per_s,
        "tokens_per_s": float(total[1].sum()) / elapsed,
        "tokens_per_s_per_worker": local_tokens / elapsed,
        "audio_s_per_s": audio_tokens / w.audio_per_s / elapsed,
    }
    if w.peak_flops is not None:
        metrics["mfu"] = mfu(local_tokens / elapsed, w.flops_per_token, w.peak_flops)
    return metrics


def _dashboard(metrics: dict[str, Any], elapsed: float, rank: int) -> None:
    """This rank's tokens and audio as counters; rank 0 sets the run-wide gauges."""
    METRICS.record("tokens", metrics["tokens_per_s_per_worker"] * elapsed)
    METRICS.record("audio_s", metrics["local_audio_s"])
    if rank == 0:
        for key in ("tokens_per_s", "loss", "eval_loss", "mfu"):
            if isinstance(metrics.get(key), float) and math.isfinite(metrics[key]):
                METRICS.record(key, metrics[key])


def _report(metrics: dict[str, Any], folder: str | None, step: int) -> None:
    """``ray.train.report`` with this rank's checkpoint folder (removed once Ray has it)."""
    import ray.train

    try:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
            checkpoint_dir_name=f"checkpoint_{checkpoint_tag(step)}" if folder else None,
        )
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def held_out_metrics(w: Worker, rows: list[Packed]) -> dict[str, float]:
    """``eval_*`` figures over this rank's held-out rows (reduced over ranks)."""
    tc = w.cfg.train
    pad = w.layout.vocab.text_pad
    ev = _evaluate(w.engine, rows, tc.micro_batch, tc.seq_len, pad, w.weights, w.device)
    return stats_metrics(ev, w.weights, prefix="eval_") if ev[1].sum() > 0 else {}


def _checkpoint(w: Worker, step: int, position: Position, metrics: dict, last_saved: int) -> str:
    """This rank's checkpoint folder, only ever of finite weights (every rank checks)."""
    if not weights_finite(w.engine, w.device):
        raise NonFiniteTraining(
            f"the weights are non-finite at step {step}: not checkpointing them. The "
            f"latest checkpoint (step {last_saved}) holds the last good weights."
        )
    return save(w.engine, step, position, w.rank, w.world, {"metrics": metrics})


def train_loop(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": Config.model_dump(), "layout": Layout.to_dict()}``.

    Steps until ``train.max_steps`` (or ``stop_after_step``); every ``log_every`` steps it
    reports the window's figures, every ``eval_every`` the held-out loss, and every
    ``checkpoint_every`` a checkpoint scored by that loss."""
    import ray.train

    w = start_worker(config)
    tc = w.cfg.train
    step, position = 0, Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, position = restore(w.engine, folder, w.rank, w.world)
    resumed_from = step
    stream = TrainStream(
        ray.train.get_dataset_shard("train"), w.layout, tc.seq_len, tc.micro_batch, w.rank,
        w.world, tc.seed, tc.shuffle_buffer, position,
    )  # fmt: skip
    eval_iter = ray.train.get_dataset_shard("eval")
    held_out: list[Packed] | None = None
    last = min(tc.max_steps, tc.stop_after_step or tc.max_steps)

    acc = torch.zeros(3, len(w.weights), device=w.device)
    in_a_row, last_saved = 0, resumed_from
    window_start, window_steps = time.perf_counter(), 0
    while step < last:
        lr = w.engine.get_lr()[0]
        stats = _train_step(w.engine, stream, tc.grad_accum, w.weights, w.device)
        step += 1
        window_steps += 1
        if stats is None:
            in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            if in_a_row >= tc.max_nonfinite_steps:
                raise NonFiniteTraining(
                    f"{in_a_row} training steps in a row had a non-finite loss or gradient "
                    f"(up to step {step}); stopping (train.max_nonfinite_steps="
                    f"{tc.max_nonfinite_steps}). The latest checkpoint (step {last_saved}) "
                    "holds the last good weights; check the data or lower train.lr."
                )
        else:
            in_a_row = 0
            acc += stats

        do_ckpt = step % tc.checkpoint_every == 0 or step == last
        # every checkpoint is scored by its eval loss (the best one is kept, see run.py)
        do_eval = step % tc.eval_every == 0 or do_ckpt
        if not (do_eval or do_ckpt or step % tc.log_every == 0):
            continue
        if tc.use_gpu:
            torch.cuda.synchronize(w.device)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        norm = w.engine.get_global_grad_norm()
        metrics = {
            "step": step,
            "epoch": stream.position.epoch,
            "resumed_from_step": resumed_from,
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else math.nan,
            **window_metrics(w, acc, elapsed, window_steps),
        }
        if do_eval:
            if held_out is None:  # read once, on first use
                n_rows = tc.eval_max_batches * tc.micro_batch
                held_out = eval_rows(eval_iter, w.layout, tc.seq_len, w.rank, w.world, n_rows)
            metrics.update(held_out_metrics(w, held_out))
        folder = None
        if do_ckpt:
            folder = _checkpoint(w, step, stream.position, metrics, last_saved)
            last_saved = step
        metrics = {k: v for k, v in metrics.items() if v is not None}
        _dashboard(metrics, elapsed, w.rank)
        _report(metrics, folder, step)
        acc.zero_()
        window_start, window_steps = time.perf_counter(), 0
