"""Stage 4: ``run_train(cfg)`` — Ray Train ``TorchTrainer`` + DeepSpeed over ``tokens/``.

Everything that can be wrong with the config or the tokens fails here, before a worker
starts: the seq_len against the layout, the codec of the tokens. Resuming is rerunning:
the run lives at ``storage.root/train/<run_name>`` and Ray Train hands the latest
checkpoint to the workers. At the end, the final checkpoint is consolidated and exported
to ``storage.root/models/<run_name>`` by a Ray task (on a GPU node when training used GPUs).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import ray.train
from ray.data import ExecutionOptions
from ray.data.block import BlockAccessor
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from voxtral.config import Config, ConfigError
from voxtral.layout import Layout
from voxtral.model import layout_for
from voxtral.ray_utils import read_parquet
from voxtral.stages import report
from voxtral.stages.train.checkpoint import TRAIN_STATE
from voxtral.stages.train.data import (
    chunk_stream,
    eval_videos,
    row_codes,
    row_user_codes,
    row_windows,
    split_batch,
    windows_batch,
)
from voxtral.stages.train.export import export_run
from voxtral.stages.train.loop import train_loop
from voxtral.stages.train.token_check import check_tokens
from voxtral.storage import Storage

log = logging.getLogger("voxtral.stages.train")

TOKEN_COLUMNS = [
    "chunk_id",
    "video_id",
    "codec",
    "n_q",
    "frames",
    "codes",
    "text_ids",
    "text_starts_s",
]
DUPLEX_COLUMNS = ["user_codes"]
METRICS_FILE = "metrics.jsonl"
DRIVER_WINDOWS_BYTES = 16 << 20
"""Windows below this are cut in the driver (:func:`window_dataset`'s ``in_driver``)."""


def token_columns(layout: Layout) -> list[str]:
    """The TOKENS columns training reads: ``user_codes`` only for a 2-stream layout, so token
    folders from before full duplex (no such column) still train a 1-stream model."""
    return TOKEN_COLUMNS + (DUPLEX_COLUMNS if layout.streams == 2 else [])


def validate(cfg: Config) -> Layout:
    """The layout of ``cfg``, after checking the train section against it."""

    try:
        layout = layout_for(cfg)
        cfg.train.check_layout(layout.group_len)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return layout


def _windows(batch: dict, layout: Layout, seq_len: int, held_out: frozenset, keep_eval: bool):
    return windows_batch(split_batch(batch, held_out, keep_eval), layout, seq_len)


def window_dataset(
    storage: Storage,
    layout: Layout,
    seq_len: int,
    held_out: frozenset,
    keep_eval: bool,
    materialize: bool,
    in_driver: bool = False,
):
    """``tokens/`` → a Ray Dataset of windows of one split (file order kept).

    ``materialize`` holds the windows in the object store once, for corpora small enough
    that re-reading them (every worker reads the split, every epoch) is the cost.
    ``in_driver`` cuts them here and puts them there, for a corpus of a few MB (the sample,
    a test's): Ray Data's read and map tasks would start worker processes for well under
    a second of work (12–15 s per split on 2 cores). The rows, in their order, are the same.
    """
    columns = token_columns(layout)
    fn_kwargs = {
        "layout": layout,
        "seq_len": seq_len,
        "held_out": held_out,
        "keep_eval": keep_eval,
    }
    if in_driver:
        table = storage.read_table("tokens", columns)
        out = _windows(BlockAccessor.for_block(table).to_batch_format("numpy"), **fn_kwargs)
        windows = pa.array(list(out["window"]), pa.binary())
        chunks = pa.array(list(out["chunk_id"]), pa.string())
        return ray.data.from_arrow(pa.table({"window": windows, "chunk_id": chunks}))
    ds = read_parquet(storage.parquet_files("tokens"), storage.fs, columns)
    ds = ds.map_batches(_windows, batch_format="numpy", fn_kwargs=fn_kwargs)
    # Workers shard by position in this order, so it must not depend on task timing.
    ds.context.execution_options.preserve_order = True
    return ds.materialize() if materialize else ds


def window_bytes(frames: int, layout: Layout) -> int:
    """Bytes of the windows of ``frames`` codec frames (int32 ids)."""
    return frames // layout.frames_per_group * layout.group_len * 4


def run_dir(cfg: Config) -> str:
    return Storage(cfg.storage.root).uri("train", cfg.train.run_name)


def read_metrics(cfg: Config) -> list[dict]:
    """Every reported step of the run (rank 0's view), oldest first."""
    storage = Storage(cfg.storage.root)
    rel = f"train/{cfg.train.run_name}/{METRICS_FILE}"
    if not storage.exists(rel):
        return []
    return [json.loads(line) for line in storage.read_bytes(rel).decode().splitlines() if line]


def _metrics_callback(root: str, run_name: str):
    class MetricsLog(UserCallback):
        """Keeps ``train/<run>/metrics.jsonl`` on the controller: one line per report. A
        step reported again after a restart replaces the lines from that step on."""

        def __init__(self):
            self.root, self.rel = root, f"train/{run_name}/{METRICS_FILE}"
            self.lines: list[dict] | None = None

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or not metrics[0]:
                return
            storage = Storage(self.root)
            if self.lines is None:
                self.lines = []
                if storage.exists(self.rel):
                    raw = storage.read_bytes(self.rel).decode().splitlines()
                    self.lines = [json.loads(x) for x in raw if x]
            m = {k: v for k, v in metrics[0].items() if isinstance(v, int | float | str)}
            step = m.get("step", math.inf)
            self.lines = [x for x in self.lines if x.get("step", -1) < step] + [m]
            body = "".join(json.dumps(x) + "\n" for x in self.lines)
            storage.write_bytes(self.rel, body.encode())

    return MetricsLog()


def _prompt_window(
    storage: Storage, index, held_out: frozenset, layout: Layout, seq_len: int
) -> tuple[np.ndarray | None, dict]:
    """The first window of the first held-out chunk (a training chunk if none is held out).
    With 2 streams, that chunk's whole stream: the sample's user track continues past the
    prompt with the chunk's own user audio, which may run beyond one window."""
    chunk_ids = index.column("chunk_id").to_pylist()
    videos = index.column("video_id").to_pylist()
    pool = sorted(c for c, v in zip(chunk_ids, videos, strict=True) if v in held_out)
    split = "eval" if pool else "train"
    pool = pool or sorted(chunk_ids)
    if not pool:
        return None, {}
    files = pads.dataset(storage.parquet_files("tokens"), filesystem=storage.fs, format="parquet")
    row = files.to_table(columns=token_columns(layout), filter=pc.field("chunk_id") == pool[0])
    r = row.slice(0, 1).to_pylist()[0]
    codes = row_codes(r["codes"], r["n_q"], r["frames"])
    source = {"prompt_chunk_id": r["chunk_id"], "prompt_video_id": r["video_id"], "split": split}
    if layout.streams == 2:
        ids = chunk_stream(
            layout, codes, r["text_ids"], r["text_starts_s"], row_user_codes(r, layout)
        )
        return (ids if len(ids) > 1 else None), source
    wins = row_windows(layout, codes, r["text_ids"], r["text_starts_s"], seq_len)
    return (wins[0] if wins else None), source


def latest_state(storage: Storage, run_name: str) -> dict | None:
    """``train_state.json`` of the run's newest checkpoint in storage, if any."""
    names = [n for n in storage.listdir("train", run_name) if n.startswith("checkpoint_")]
    for name in sorted(names, reverse=True):
        rel = f"train/{run_name}/{name}/{TRAIN_STATE}"
        if storage.exists(rel):
            return storage.read_json(rel)
    return None


def _totals(history: list[dict]) -> dict:
    """Run-wide figures from the metrics log (each line covers the steps since the last)."""
    tokens = sum(m.get("tokens", 0.0) for m in history)
    audio_s = sum(m.get("audio_s", 0.0) for m in history)
    train_s = sum(m.get("window_s", 0.0) for m in history)
    return {
        "tokens_trained": int(tokens),
        "audio_hours_trained": round(audio_s / 3600, 4),
        "train_hours": round(train_s / 3600, 4),
        "x_realtime": round(audio_s / train_s, 2) if train_s else None,
    }


def format_summary(s: dict) -> str:
    """The summary table printed at the end of the stage."""
    keys = (
        "run_name",
        "skipped",
        "step",
        "finished",
        "chunks",
        "videos_held_out",
        "tokens_trained",
        "audio_hours_trained",
        "x_realtime",
        "tokens_per_s",
        "loss",
        "eval_loss",
        "nonfinite_steps",
        "export",
    )
    return report.table("train summary", [(k, s.get(k)) for k in keys])


def _export_task(cfg_dict: dict, checkpoint, prompt, source: dict, extra: dict) -> str:
    cfg = Config.model_validate(cfg_dict)
    with checkpoint.as_directory() as folder:
        state = json.loads(Path(folder, TRAIN_STATE).read_text())
        return export_run(
            cfg, folder, state["tag"], prompt, source, {**extra, "step": state["step"]}
        )


def _best_checkpoint(result) -> str | None:
    """Path of the kept checkpoint with the lowest finite eval loss, if any was scored."""
    scored = [
        (m["eval_loss"], c.path)
        for c, m in (getattr(result, "best_checkpoints", None) or [])
        if isinstance(m.get("eval_loss"), float) and math.isfinite(m["eval_loss"])
    ]
    return min(scored)[1] if scored else None


def make_trainer(cfg: Config, layout: Layout, datasets: dict, storage: Storage) -> TorchTrainer:
    """The Ray Train plan: ``train.num_workers`` workers running :func:`train_loop`, named
    and stored so that rerunning resumes, keeping the best checkpoints by eval loss."""
    tc = cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.for_cluster(), "layout": layout.to_dict()},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        run_config=RunConfig(
            name=tc.run_name,
            storage_path=storage.uri("train"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            # Ranked by eval loss (every checkpoint step evaluates); Ray always keeps the
            # latest too, which is what a restart resumes from.
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute="eval_loss",
                checkpoint_score_order="min",
            ),
            callbacks=[_metrics_callback(cfg.storage.root, tc.run_name)],
        ),
        datasets=datasets,
        # Each worker reads the whole split in file order and takes its own share (see
        # voxtral.stages.train.stream): deterministic shards, exact resume, no epoch deadlock.
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


@contextmanager
def sigint_kept() -> Iterator[None]:
    """Give SIGINT back to its owner once ``fit`` returns. Ray Train installs a handler that
    aborts the run and leaves it installed after the run is over; in ``jobs/everything.py``
    the serve phase that follows then could not be stopped with Ctrl-C ("Gracefully aborting
    the training run", and the process stayed up)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers (and Ray Train sets none from others)
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def run_train(cfg: Config) -> dict:
    """Train (or resume) ``cfg.train.run_name``; export at the end. Returns a summary."""
    tc = cfg.train
    layout = validate(cfg)
    storage = Storage(cfg.storage.root)
    index = check_tokens(storage, cfg.codec, layout)
    done = latest_state(storage, tc.run_name)
    export = storage.current(f"models/{tc.run_name}")  # on object stores: its current version
    export_done = storage.exists(export, "voxtral.json")
    if done and done["step"] >= tc.max_steps and (export_done or not tc.export):
        summary = {
            "run_name": tc.run_name,
            "skipped": f"already trained to step {done['step']} (train.max_steps={tc.max_steps})",
            "step": done["step"],
            "finished": True,
            "export": storage.uri(export) if export_done else None,
            **_totals(read_metrics(cfg)),
        }
        return summary
    held_out = frozenset(
        eval_videos(index.column("video_id").to_pylist(), tc.eval_fraction, tc.seed)
    )
    if tc.use_gpu and ray.cluster_resources().get("GPU", 0) < tc.num_workers:
        log.warning(
            "train.use_gpu with %d workers but the cluster has %s GPUs now: waiting "
            "for the autoscaler",
            tc.num_workers,
            ray.cluster_resources().get("GPU", 0),
        )
    nbytes = window_bytes(int(pc.sum(index.column("frames")).as_py() or 0), layout)
    small = nbytes < (tc.materialize_mb << 20)
    tiny = small and nbytes < DRIVER_WINDOWS_BYTES
    datasets = {
        split: window_dataset(
            storage, layout, tc.seq_len, held_out, split == "eval", small, in_driver=tiny
        )
        for split in ("train", "eval")
    }
    trainer = make_trainer(cfg, layout, datasets, storage)
    with sigint_kept():
        result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    final = dict(result.metrics or {})
    step = int(final.get("step", 0))
    history = read_metrics(cfg)
    summary = {
        "run_name": tc.run_name,
        "step": step,
        "finished": step >= tc.max_steps,
        "videos_held_out": len(held_out),
        "chunks": index.num_rows,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": _best_checkpoint(result),
        "metrics_file": f"{run_dir(cfg)}/{METRICS_FILE}",
        "first_loss": history[0].get("loss") if history else None,
        "loss": final.get("loss"),
        "eval_loss": final.get("eval_loss"),
        "tokens_per_s": final.get("tokens_per_s"),
        "nonfinite_steps": final.get("nonfinite_steps"),
        "export": None,
        **_totals(history),
    }
    if tc.export and summary["finished"] and result.checkpoint is not None:
        prompt, source = _prompt_window(storage, index, held_out, layout, tc.seq_len)
        extra = {"run_name": tc.run_name, "eval_loss": final.get("eval_loss")}
        task = ray.remote(num_cpus=1, num_gpus=1 if tc.use_gpu else 0)(_export_task)
        summary["export"] = ray.get(
            task.remote(cfg.for_cluster(), result.checkpoint, prompt, source, extra)
        )
    return summary
