"""The end of a run: ZeRO shards → one Hugging Face folder, plus a generated sample.

Consolidation reads the fp32 master weights from the optimizer shards of the final
checkpoint (DeepSpeed's ``zero_to_fp32``), so the export is the exact trained weights on
both ZeRO stages, not a bf16 copy gathered from the GPUs. The folder is written under a
temporary name and renamed into place, so ``serve`` never loads half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from voxtral.config import Config
from voxtral.storage import TMP_PREFIX, Storage
from voxtral.tokenizer import Layout, decode_ids
from voxtral.train.sample import generate_ids, prompt_from_window, tokens_for_seconds

SAMPLE_WAV = "sample.wav"
SAMPLE_JSON = "sample.json"


def consolidated_state_dict(folder: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO-2/3 checkpoint folder (any number of shards)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)
    return {k: v.contiguous() if hasattr(v, "contiguous") else v for k, v in sd.items()}


def load_trained(cfg: Config, state_dict: dict[str, torch.Tensor]):
    """A fresh speech LM for ``cfg`` with the trained weights in; (model, tokenizer, layout)."""
    from voxtral.model import build_speech_lm

    model, tokenizer, layout = build_speech_lm(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m in params]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if model.is_activation_checkpointing:
        model.activation_checkpointing_disable()
    model.config.use_cache = True  # serving generates with a KV cache
    return model.eval(), tokenizer, layout


def write_sample(
    model, tokenizer, layout: Layout, cfg: Config, window: np.ndarray, folder: Path, source: dict
) -> dict:
    """Generate ``train.sample_seconds`` after ``train.prompt_seconds`` of ``window`` and
    write prompt + continuation as a WAV (decoded with the codec) and a JSON note."""
    import soundfile as sf

    from voxtral.codec import load_codec

    tc = cfg.train
    prompt = prompt_from_window(layout, window, tc.prompt_seconds)
    new = generate_ids(
        model, layout, prompt, tokens_for_seconds(layout, tc.sample_seconds), seed=tc.seed
    )
    ids = np.concatenate([prompt, new])
    codes, text = decode_ids(layout, ids)
    device = next(model.parameters()).device
    codec = load_codec(cfg.codec, device=device)
    wav = codec.decode(torch.as_tensor(codes)[None])[0, 0].float().cpu().numpy()
    sf.write(folder / SAMPLE_WAV, wav, codec.sample_rate, subtype="PCM_16")
    note = {
        **source,
        "prompt_s": (len(prompt) - 1) / layout.group_len * layout.group_s,
        "generated_s": len(new) / layout.group_len * layout.group_s,
        "sample_rate": codec.sample_rate,
        "text": tokenizer.decode(text),
        "ids": ids.tolist(),
    }
    (folder / SAMPLE_JSON).write_text(json.dumps(note))
    return note


def export_run(
    cfg: Config,
    checkpoint_folder: str,
    tag: str,
    prompt_window: np.ndarray | None,
    prompt_source: dict,
    extra: dict,
) -> str:
    """Consolidate, export to ``storage.root/models/<run_name>`` and add the sample."""
    from voxtral.model import export_speech_lm

    storage = Storage(cfg.storage.root)
    model, tokenizer, layout = load_trained(cfg, consolidated_state_dict(checkpoint_folder, tag))
    if torch.cuda.is_available() and cfg.train.use_gpu:
        model.to("cuda")
    name = cfg.train.run_name
    staging = (
        Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        if not storage.local
        else Path(storage.makedirs("models"), f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    )
    try:
        if cfg.train.sample_seconds > 0 and prompt_window is not None:
            staging.mkdir(parents=True, exist_ok=True)
            write_sample(model, tokenizer, layout, cfg, prompt_window, staging, prompt_source)
        model.to("cpu", dtype=getattr(torch, cfg.model.dtype))
        meta = {"codec_config": cfg.codec.model_dump(), "base": cfg.model.base, **extra}
        export_speech_lm(model, tokenizer, layout, staging, extra=meta)
        return _publish(storage, staging, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(storage: Storage, staging: Path, name: str) -> str:
    """Move the finished folder to ``models/<name>`` (replacing an older export)."""
    import pyarrow.fs as pafs

    target = storage.path("models", name)
    if storage.local:
        old = None
        if os.path.exists(target):
            old = storage.path("models", f"{TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(staging, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    else:
        storage.delete("models", name)
        pafs.copy_files(
            str(staging),
            target,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=storage.fs,
        )
    return storage.uri("models", name)
