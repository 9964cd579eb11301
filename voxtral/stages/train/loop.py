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

import json
import logging
import math
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from voxtral.config import Config
from voxtral.stages.train.data import Packed, collate, empty_like_batch
from voxtral.stages.train.loss import stats_metrics, stream_loss, stream_weights
from voxtral.stages.train.stream import Position, TrainStream, eval_rows

TRAIN_STATE = "train_state.json"
log = logging.getLogger("voxtral.stages.train")


class NonFiniteTraining(RuntimeError):
    """Training produced non-finite losses or weights and cannot go on safely."""


def data_state_name(rank: int) -> str:
    return f"data_rank{rank}.json"


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def _to_device(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict[str, torch.Tensor], weights: torch.Tensor):
    """Weighted loss and per-stream stats of one micro-batch (a hook point for tests)."""
    out = engine(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=None,  # packed windows: the mask comes from the position resets
        use_cache=False,
    )
    return stream_loss(out.logits, batch["labels"], batch["streams"], weights)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _evaluate(
    engine, rows: list[Packed], micro_batch: int, seq_len: int, pad_id: int, weights, device
) -> torch.Tensor:
    """Summed per-stream stats over this rank's held-out rows. Every rank runs as many
    forwards as the rank with most (ZeRO-3 gathers parameters collectively), padding with
    batches that train nothing."""
    batches = [collate(rows[i : i + micro_batch]) for i in range(0, len(rows), micro_batch)]
    batches = [b for b in batches if len(b["input_ids"]) == micro_batch]
    n = _all_reduce(torch.tensor([len(batches)], device=device), _max_op())
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
    return _all_reduce(total)


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


def _weights_finite(engine, device) -> bool:
    """Whether every weight on every rank is finite (ZeRO-3: each rank checks its partition)."""
    bad = 0
    with torch.no_grad():
        for p in engine.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps the rank's shard there
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = 1
                break
    flag = _all_reduce(torch.tensor([bad], device=device), _max_op())
    return int(flag.item()) == 0


def _max_op():
    import torch.distributed as dist

    return dist.ReduceOp.MAX


def _restore(engine, folder: str, rank: int, world: int) -> tuple[int, Position]:
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


def _save(engine, step: int, position: Position, rank: int, world: int, extra: dict) -> str:
    folder = tempfile.mkdtemp(prefix=f"voxtral-ckpt-r{rank}-")
    tag = checkpoint_tag(step)
    engine.save_checkpoint(folder, tag=tag, client_state={"step": step}, save_latest=False)
    Path(folder, data_state_name(rank)).write_text(json.dumps(vars(position)))
    if rank == 0:
        state = {"tag": tag, "step": step, "world_size": world, **extra}
        Path(folder, TRAIN_STATE).write_text(json.dumps(state, indent=2))
    return folder


def init_deepspeed_distributed(use_gpu: bool) -> None:
    """``deepspeed.init_distributed`` on the process group Ray Train made (nccl / gloo).

    On CPU, DeepSpeed would JIT-compile its shared-memory allreduce op here; its build key
    includes the interpreter's path, which Ray's per-session working-dir copy changes, so
    every session would recompile it (minutes on a small node), for an allreduce that gloo
    already does. DeepSpeed (0.19) has no switch for it, so its builder is replaced by one
    that builds nothing for this call only (its backend reads it once, when constructed);
    collectives go through torch.distributed.
    """
    import importlib

    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the attribute is torch)
    build_shm_op = ds_torch.build_shm_op
    if not use_gpu:
        ds_torch.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    finally:
        ds_torch.build_shm_op = build_shm_op


def _ray_metrics() -> dict | None:
    """Counters and gauges for the Ray dashboard (None outside a Ray worker)."""
    try:
        from ray.util.metrics import Counter, Gauge

        return {
            "tokens": Counter("voxtral_train_tokens", "Tokens trained on (targets)."),
            "audio_s": Counter("voxtral_train_audio_seconds", "Seconds of audio trained on."),
            "tokens_per_s": Gauge("voxtral_train_tokens_per_s", "Tokens/s, all workers."),
            "loss": Gauge("voxtral_train_loss", "Weighted training loss."),
            "eval_loss": Gauge("voxtral_train_eval_loss", "Weighted held-out loss."),
            "mfu": Gauge("voxtral_train_mfu", "Model FLOPs utilisation of a GPU."),
        }
    except Exception:  # noqa: BLE001 - metrics are optional
        return None


def _report_metrics(
    gauges: dict | None, metrics: dict, local_tokens: float, local_audio_s: float, rank: int
) -> None:
    if gauges is None:
        return
    if local_tokens > 0:
        gauges["tokens"].inc(local_tokens)
    if local_audio_s > 0:
        gauges["audio_s"].inc(local_audio_s)
    if rank == 0:
        for key in ("tokens_per_s", "loss", "eval_loss", "mfu"):
            if isinstance(metrics.get(key), float) and math.isfinite(metrics[key]):
                gauges[key].set(metrics[key])


def train_loop(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": Config.model_dump(), "layout": Layout.to_dict()}``."""
    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    use_gpu = tc.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")

    import deepspeed
    import ray.train
    import ray.train.torch

    from voxtral.model import build_speech_lm
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
    from voxtral.tokenizer import Layout

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    init_deepspeed_distributed(use_gpu)
    torch.manual_seed(tc.seed)

    # bf16 on GPU: ZeRO keeps the fp32 master copy; loading in bf16 halves host memory.
    # ZeRO-3 partitions the weights while they load (see build_speech_lm).
    ds_config = deepspeed_config(tc, world, use_gpu)
    model, _tokenizer, layout = build_speech_lm(
        cfg, dtype=torch.bfloat16 if use_gpu else torch.float32, ds_config=ds_config
    )
    # The share of the weights this rank holds once built: 1 unless ZeRO-3 partitioned them.
    built_fraction = local_param_count(model) / param_count(model)
    expected = Layout.from_dict(config["layout"])
    if layout != expected:
        raise RuntimeError(f"worker layout {layout} differs from the driver's {expected}")
    model.config.use_cache = False
    n_matmul = matmul_params(model)
    flops_tok = flops_per_token(model.config, n_matmul, tc.seq_len)
    if use_gpu and tc.zero_stage == 3:  # the partitions sit on the device already
        for buf in model.buffers():
            buf.data = buf.data.to(device)
    elif use_gpu:
        model.to(device)
    optimizer = build_optimizer(model, tc, use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=param_groups(model, tc.weight_decay) if optimizer is None else None,
        lr_scheduler=partial(build_lr_scheduler, cfg=tc),
        config=ds_config,
    )

    step, position = 0, Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, position = _restore(engine, folder, rank, world)
    resumed_from = step

    weights = stream_weights(tc).to(device)
    stream = TrainStream(
        ray.train.get_dataset_shard("train"),
        layout,
        tc.seq_len,
        tc.micro_batch,
        rank,
        world,
        tc.seed,
        tc.shuffle_buffer,
        position,
    )
    eval_iter = ray.train.get_dataset_shard("eval")
    held_out: list[Packed] | None = None
    peak = peak_flops(torch.cuda.get_device_name(device), tc.peak_tflops) if use_gpu else None
    audio_per_s = layout.vocab.n_q * layout.frame_rate  # audio tokens per second of audio
    last = min(tc.max_steps, tc.stop_after_step or tc.max_steps)

    gauges = _ray_metrics()
    acc = torch.zeros(3, len(weights), device=device)
    grad_norm = math.nan
    in_a_row, last_saved = 0, resumed_from
    window_start, window_steps = time.perf_counter(), 0
    engine.train()  # from_pretrained returns eval mode: no dropout, no checkpointing
    while step < last:
        lr = engine.get_lr()[0]
        stats = _train_step(engine, stream, tc.grad_accum, weights, device)
        step += 1
        window_steps += 1
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
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
        local_tokens = float(acc[1].sum())
        local_audio_s = float(acc[1, 2:].sum()) / audio_per_s
        total = _all_reduce(acc.clone())
        if use_gpu:
            torch.cuda.synchronize(device)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        audio_tokens = float(total[1, 2:].sum())
        metrics = {
            "step": step,
            "epoch": stream.position.epoch,
            "resumed_from_step": resumed_from,
            "built_param_fraction": built_fraction,
            **stats_metrics(total, weights),
            "lr": lr,
            "grad_norm": grad_norm,
            "nonfinite_steps": int(engine.skipped_steps),  # run total (kept in checkpoints)
            "step_time_s": elapsed / window_steps,
            "window_s": elapsed,
            "audio_s": audio_tokens / audio_per_s,
            "tokens_per_s": float(total[1].sum()) / elapsed,
            "tokens_per_s_per_worker": local_tokens / elapsed,
            "audio_s_per_s": audio_tokens / audio_per_s / elapsed,
        }
        if use_gpu:
            metrics["mfu"] = mfu(local_tokens / elapsed, flops_tok, peak)
        if do_eval:
            if held_out is None:
                held_out = eval_rows(
                    eval_iter, layout, tc.seq_len, rank, world, tc.eval_max_batches * tc.micro_batch
                )
            ev = _evaluate(
                engine, held_out, tc.micro_batch, tc.seq_len, layout.vocab.text_pad, weights, device
            )
            if ev[1].sum() > 0:
                metrics.update(stats_metrics(ev, weights, prefix="eval_"))
        folder = None
        if do_ckpt:
            if not _weights_finite(engine, device):
                raise NonFiniteTraining(
                    f"the weights are non-finite at step {step}: not checkpointing them. The "
                    f"latest checkpoint (step {last_saved}) holds the last good weights."
                )
            folder = _save(engine, step, stream.position, rank, world, {"metrics": metrics})
            last_saved = step
        metrics = {k: v for k, v in metrics.items() if v is not None}
        _report_metrics(gauges, metrics, local_tokens, local_audio_s, rank)
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                checkpoint_dir_name=f"checkpoint_{checkpoint_tag(step)}" if folder else None,
            )
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        acc.zero_()
        window_start, window_steps = time.perf_counter(), 0
