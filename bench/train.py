"""Training throughput of one worker: the loop's own forward/backward/step under DeepSpeed.

Prints one JSON line: device, params, zero_stage, micro_batch, seq_len,
tokens_per_s_per_worker, mfu (null on CPU), the attention kernel, compile and checkpointing
settings, and a few more figures. No Ray: one process, world size 1, so the number is the
per-worker compute rate the Ray run multiplies.

    uv run bench/train.py                                  # tiny model, CPU
    python bench/train.py --device cuda --model 1b         # ~1B random Mistral on a GPU
    python bench/train.py --device cuda --model 7b-pruned --zero-stage 3 --attention flex
    uv run bench/train.py --bf16 --check-precision         # bf16 + fp32 masters, on CPU

``--model``: ``tiny`` (the pipeline's), or a shape of ``bench/shapes.py``: ``small``, ``1b``,
``7b-pruned`` (Mistral-7B's config with every ``--keep-every``-th layer, 4 by default: 8
layers, ~2 B parameters, which trains on one 80 GB GPU without offload). Weights are
random: nothing is downloaded.
``--check-precision`` adds the fp32-master figures of :mod:`bench.precision`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.shapes import MISTRAL_VOCAB, mistral_config  # noqa: E402
from voxtral.stages.train.attention import CHOICES  # noqa: E402

MODELS = {"small": "small", "1b": "1b", "7b-pruned": "7b"}  # --model → bench/shapes.py


def _init_single_process(backend: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    ).items():
        os.environ.setdefault(k, v)
    from voxtral.stages.train.dist import init_deepspeed_distributed

    init_deepspeed_distributed(backend == "nccl")


def build(args, cfg, device):
    """(model, layout): the pipeline's tiny model, or a random Mistral of a bench shape with
    the speech vocabulary added the same way the pipeline adds it."""
    from voxtral.codec import codec_info
    from voxtral.layout import make_layout
    from voxtral.model import add_speech_tokens, build_speech_lm, enable_gradient_checkpointing

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model == "tiny":
        model, _, layout = build_speech_lm(cfg, dtype=dtype)
    else:
        from transformers import MistralForCausalLM

        keep = args.keep_every if args.model == "7b-pruned" else 1
        mc = mistral_config(MODELS[args.model], MISTRAL_VOCAB, keep)
        torch.manual_seed(0)
        with device:
            model = MistralForCausalLM(mc).to(dtype)
        layout = make_layout(codec_info(cfg.codec), mc.vocab_size, cfg.tokenizer)
        add_speech_tokens(model, layout)
    if cfg.model.gradient_checkpointing and not model.is_activation_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False
    return model.to(device), layout


def batches(layout, seq_len: int, micro_batch: int, split: bool = True, seed: int = 0):
    """Packed batches of random chunks of 10–30 s, laid out and packed as in training."""
    from voxtral.stages.train.data import collate, pack, row_windows

    rng = np.random.default_rng(seed)

    def windows():
        while True:
            seconds = rng.uniform(10, 30)
            frames = int(seconds * layout.frame_rate)
            shape = (layout.vocab.n_q, frames)
            codes = rng.integers(0, layout.vocab.codebook_size, shape)
            # two streams (full duplex): the user's track too
            user = (
                rng.integers(0, layout.vocab.codebook_size, shape) if layout.streams == 2 else None
            )
            n_text = int(seconds * 3)
            text = rng.integers(0, layout.vocab.text_size, n_text)
            starts = np.sort(rng.uniform(0, seconds, n_text))
            yield from row_windows(layout, codes, text, starts, seq_len, user_codes=user)

    rows = pack(windows(), layout, seq_len, layout.vocab.text_pad, split=split)
    while True:
        yield collate([next(rows) for _ in range(micro_batch)])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model", choices=["tiny", *MODELS], default=None, help="default: tiny on CPU, 1b on CUDA"
    )
    p.add_argument("--keep-every", type=int, default=4, help="7b-pruned: keep every k-th layer")
    p.add_argument("--attention", choices=CHOICES, default="auto", help="train.attention")
    p.add_argument("--compile", action="store_true", help="train.compile (engine.compile)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 compute with fp32 masters (default: on CUDA only)",
    )
    p.add_argument("--check-precision", action="store_true", help="fp32 masters, export")
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="rounded down to whole groups")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--no-split", action="store_true", help="pack without splitting windows")
    p.add_argument("--config", default=None, help="pipeline config (default configs/local.yaml)")
    p.add_argument("--quick", action="store_true", help="smoke run: seconds of work")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    args.model = args.model or ("1b" if args.device == "cuda" else "tiny")
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16

    from voxtral.config import DEFAULT_CONFIG, load_config

    os.environ.setdefault("DS_ACCELERATOR", args.device)
    overrides = ["model.gradient_checkpointing=true"] if args.grad_ckpt else []
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides, env={})
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_single_process("nccl" if device.type == "cuda" else "gloo")
    model, layout = build(args, cfg, device)
    # --seq-len is a round figure (4096): the largest window of <bos> + whole groups under it,
    # so one command line fits every layout (the token layout follows the config)
    seq_len = cfg.train.seq_len
    if args.seq_len:
        seq_len = 1 + (args.seq_len - 1) // layout.group_len * layout.group_len
    micro = args.micro_batch or cfg.train.micro_batch
    tc = cfg.train.model_copy(
        update=dict(
            zero_stage=args.zero_stage,
            micro_batch=micro,
            grad_accum=1,
            seq_len=seq_len,
            use_gpu=args.device == "cuda",
            offload_optimizer=False,
            offload_params=False,
            warmup_steps=1,
            max_steps=10**6,
            attention=args.attention,
            compile=args.compile,
        )
    )

    import deepspeed

    from voxtral.stages.train.attention import use_attention
    from voxtral.stages.train.loop import _forward, _to_device
    from voxtral.stages.train.loss import stream_weights
    from voxtral.stages.train.optim import (
        build_lr_scheduler,
        build_optimizer,
        deepspeed_config,
    )
    from voxtral.stages.train.perf import flops_per_token, matmul_params, mfu, peak_flops

    tc.check_layout(layout.group_len)
    kernel = use_attention(model, tc.attention, device.type)
    n_params = sum(p.numel() for p in model.parameters())
    flops_tok = flops_per_token(model.config, matmul_params(model), seq_len)
    ds_config = deepspeed_config(tc, 1, device.type == "cuda")
    ds_config["bf16"]["enabled"] = args.bf16  # CPU too, to run the GPU's precision path
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, tc, device.type == "cuda"),
        lr_scheduler=lambda opt: build_lr_scheduler(opt, tc),
        config=ds_config,
    )
    if tc.compile:
        engine.compile()
    weights = stream_weights(tc).to(device)
    data = batches(layout, seq_len, micro, split=not args.no_split)

    def step() -> float:
        batch = _to_device(next(data), device)
        loss, stats = _forward(engine, batch, weights)
        engine.backward(loss)
        engine.step()
        return stats[1].sum()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = sum(step() for _ in range(args.steps))
    tokens = float(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = tokens / dt
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {
        "device": name,
        "params": n_params,
        "zero_stage": args.zero_stage,
        "micro_batch": micro,
        "seq_len": seq_len,
        "tokens_per_s_per_worker": round(tps, 1),
        "mfu": (round(m, 4) if (m := mfu(tps, flops_tok, peak_flops(name))) is not None else None)
        if device.type == "cuda"
        else None,
        "model": args.model,
        "layers": model.config.num_hidden_layers,
        "attention": kernel,
        "compile": tc.compile,
        "bf16": args.bf16,
        "grad_checkpointing": cfg.model.gradient_checkpointing,
        "split_packing": not args.no_split,
        "step_time_s": round(dt / args.steps, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    if args.check_precision:
        from bench.precision import check
        from voxtral.model import load_text_tokenizer, resolve_base

        tokenizer = load_text_tokenizer(resolve_base(cfg.model))  # saved beside the weights
        out.update(check(engine, layout, tokenizer))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
