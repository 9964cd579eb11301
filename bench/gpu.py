"""Every GPU figure of the project in one run, for a lent GPU (run it through bench/gpu.sh).

Prints one JSON line per figure, each with ``figure`` (what it measures) and ``command``
(how to rerun that one alone), then a ``run`` line with the wall time:

- ``tokenizer``: ``encode_xrt`` (and ``decode_xrt``) per codec and batch;
- ``precision``: bf16 compute with fp32 master weights, ZeRO-2 and ZeRO-3:
  ``master_dtype``, ``module_dtype``, ``module_is_rounded_master``, ``export_round_trip``;
- ``preprocess``: ``efficiency`` (the stage against the codec alone) and ``codec_xrt``;
- ``serve``: ``first_audio_ms_p50`` and ``sessions_at_rtf_0.5`` on the 1B shape;
- ``train``: ``mfu`` and ``tokens_per_s_per_worker`` for ZeRO-2 and ZeRO-3 on the 1B and
  the pruned-7B shapes, with each attention kernel, then with activation checkpointing
  and with ``torch.compile``.

Weights are random (real shapes, ``pretrained: false`` codecs), so nothing is downloaded.
Each step is one bench script in its own process (a fresh CUDA context for every training
configuration), so the figures are those scripts' own. A step that fails or outlives its
time prints its line with ``error``; one that cannot run here (FlexAttention's backward on
CPU, flash-attn not installed, the time budget spent) prints it with ``skipped``; either
way its figure keys are there, null, and the run goes on.

``--logs DIR`` keeps each step's log and ``figures.jsonl`` (every line printed) there.
``--dry-run`` runs the same steps on CPU with the tiny shapes and the scripts' ``--quick``
sizes, two at a time (``--jobs``: most of a tiny step is process start-up), each with its
share of the cores' threads: a minute or two, the same keys, figures that mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIGURE_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("codec", "batch", "encode_xrt", "decode_xrt"),
    "precision": ("zero_stage", "master_dtype", "module_dtype", "module_is_rounded_master")
    + ("export_round_trip",),
    "preprocess": ("efficiency", "codec_xrt", "xrt"),
    "serve": ("first_audio_ms_p50", "sessions_at_rtf_0.5", "rtf_1"),
    "train": ("model", "zero_stage", "attention", "compile", "grad_checkpointing")
    + ("mfu", "tokens_per_s_per_worker"),
}
ATTENTIONS = ("sdpa", "flex", "flash_varlen")
GPU_BUDGET_S = 470.0  # the 8 minutes, less start-up
DRY_RUN_LIMIT_S = 900.0  # on CPU a limit only guards against a hang: machines differ widely


@dataclass
class Step:
    figure: str
    script: str
    args: list[str]
    limit_s: float  # on the GPU
    known: dict = field(default_factory=dict)  # figure keys known before it runs
    skip: str | None = None  # why it cannot run here

    @property
    def command(self) -> list[str]:
        return ["python", f"bench/{self.script}.py", *self.args]


def plan(dry_run: bool) -> list[Step]:
    """The steps in order of what matters most, so a spent budget cuts the least: the
    correctness checks, the stages' figures, then the training matrix. ``limit_s`` is what
    a step may take on an H100 (the first FlexAttention and compile runs build kernels)."""
    from voxtral.stages.train.attention import unavailable

    device = "cpu" if dry_run else "cuda"
    dev = ["--device", device]
    quick = ["--quick"] if dry_run else []
    steps: list[Step] = []
    # the dry run's precision check on short windows: bf16 matmuls are slow on a CPU (2.4 s
    # a step at the local profile's 1051 tokens, 0.6 s at 256) and the check is the same
    small = ["--model", "small", "--steps", "3"]
    if dry_run:
        small = ["--model", "tiny", "--seq-len", "256"]
    for zero in (2, 3):
        args = [*dev, *small, *quick, "--zero-stage", str(zero), "--bf16", "--check-precision"]
        steps.append(Step("precision", "train", args, 90, {"zero_stage": zero}))
    steps.append(Step("tokenizer", "tokenizer", [*dev, *(quick or ["--seconds", "30"])], 60))
    steps.append(Step("preprocess", "preprocess", [*dev, *(quick or ["--target-s", "20"])], 150))
    serve = ["--engine", *(quick or ["--base", "1b", "--sessions", "16"])]
    serve += ["--sweep", "4" if dry_run else "64"]
    # on the GPU, the real profile's codec (the full Mimi, 4 codebooks), one stream
    real = ["serve.num_gpus=1", "model.dtype=bfloat16", "codec.size=full", "codec.n_q=4"]
    serve += [] if dry_run else [a for s in real for a in ("--set", s)]
    steps.append(Step("serve", "serve", serve, 150))

    models = ("tiny",) if dry_run else ("1b", "7b-pruned")
    # a round window: bench/train.py rounds it down to whole groups of the layout, and the
    # dry run passes one too, so the CPU rehearsal checks that a layout change still fits
    gpu_size = ["--seq-len", "4096", "--micro-batch", "2", "--steps", "8", "--warmup", "3"]
    size = ["--seq-len", "1000", *quick] if dry_run else gpu_size
    plain = {"compile": False, "grad_checkpointing": False}
    for model in models:
        for zero in (2, 3):
            for attention in ATTENTIONS:
                args = [*dev, "--model", model, "--zero-stage", str(zero)]
                args += ["--attention", attention, *size]
                known = {"model": model, "zero_stage": zero, "attention": attention, **plain}
                # FlexAttention builds its kernels on first use: on the H200, 1B at 4096
                # gave no figure within 110 s (2026-12-04), so it gets more time
                limit = 300 if attention == "flex" else 120
                steps.append(
                    Step("train", "train", args, limit, known, unavailable(attention, device))
                )
    for flag, key in (("--grad-ckpt", "grad_checkpointing"), ("--compile", "compile")):
        args = [*dev, "--model", models[0], "--zero-stage", "2", "--attention", "auto", *size]
        known = {"model": models[0], "zero_stage": 2, **plain, key: True}
        steps.append(Step("train", "train", [*args, flag], 180, known))
    return steps


def blank(step: Step, **why) -> dict:
    """The step's line when it has no figures: every key, null, and why."""
    keys = {k: None for k in FIGURE_KEYS[step.figure]}
    return {"figure": step.figure, **keys, **step.known, **why, "command": " ".join(step.command)}


def run_step(
    step: Step, limit_s: float, log_dir: Path, index: int, threads: int | None = None
) -> list[dict]:
    """Run one bench script (with ``threads`` CPU threads, if given); its JSON lines,
    labelled, or one line saying what went wrong. Its whole process group is killed at the
    limit (preprocess starts Ray)."""
    log = log_dir / f"{index:02d}-{step.figure}.log"
    argv = [sys.executable, *step.command[1:]]
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return [blank(step, error=f"no result after {limit_s:.0f} s (log: {log})")]
    lines = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-1500:]
        return [blank(step, error=f"exit {proc.returncode} (log: {log}): {tail}")]
    return [{"figure": step.figure, **line, "command": " ".join(step.command)} for line in lines]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU, tiny shapes")
    p.add_argument("--budget-s", type=float, default=None, help=f"GPU default {GPU_BUDGET_S:g}")
    p.add_argument("--logs", default=None, help="folder for each step's log (default: a temp)")
    p.add_argument("--only", default=None, help="comma-separated figures to run")
    p.add_argument("--jobs", type=int, default=None, help="steps at once (GPU 1, dry run 2)")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --dry-run for the CPU rehearsal")
    budget = args.budget_s if args.budget_s is not None else (0 if args.dry_run else GPU_BUDGET_S)
    log_dir = Path(args.logs or tempfile.mkdtemp(prefix="voxtral-gpu-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {log_dir}", file=sys.stderr, flush=True)
    only = set(args.only.split(",")) if args.only else None

    jobs = args.jobs or (2 if args.dry_run else 1)
    # CPU steps side by side share the cores: torch's default of a thread per core in each
    # made them spin against each other (the dry run: 96 s, 150 s of CPU; with a share of
    # the cores each, 76 s and 101 s)
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // jobs) if args.dry_run and jobs > 1 else None
    start = time.monotonic()
    results: list[dict] = []

    def lines_of(index: int, step: Step) -> list[dict]:
        if step.skip:
            return [blank(step, skipped=step.skip)]
        limit = DRY_RUN_LIMIT_S if args.dry_run else step.limit_s
        if budget:
            left = budget - (time.monotonic() - start)
            if left < 20:
                return [blank(step, skipped=f"time budget of {budget:g} s spent")]
            limit = min(limit, left)
        print(f"== {' '.join(step.command)}", file=sys.stderr, flush=True)
        return run_step(step, limit, log_dir, index, threads)

    with open(log_dir / "figures.jsonl", "w") as figures:  # the lines again, beside the logs

        def emit(line: dict) -> None:
            for stream in (sys.stdout, figures):
                print(json.dumps(line), file=stream, flush=True)

        steps = [(i, s) for i, s in enumerate(plan(args.dry_run)) if not only or s.figure in only]
        # One GPU: one step at a time. The CPU rehearsal runs steps side by side (most of a
        # tiny step is process start-up); either way the lines come in plan order.
        with ThreadPoolExecutor(jobs) as pool:
            for lines in pool.map(lambda item: lines_of(*item), steps):
                for line in lines:
                    emit(line)
                results.extend(lines)
        emit(
            {
                "figure": "run",
                "dry_run": args.dry_run,
                "wall_s": round(time.monotonic() - start, 1),
                "lines": len(results),
                "errors": sum("error" in r for r in results),
                "skipped": sum("skipped" in r for r in results),
                "logs": str(log_dir),
            }
        )
    return results


if __name__ == "__main__":
    main()
