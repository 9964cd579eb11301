"""The end of a run: ZeRO shards → one Hugging Face folder, plus a generated sample.

Consolidation reads the fp32 master weights from the optimizer shards of the final
checkpoint (DeepSpeed's ``zero_to_fp32``), so the export is the exact trained weights on
both ZeRO stages, not a bf16 copy gathered from the GPUs. The folder is written under a
temporary name and published into place (:meth:`voxtral.storage.Storage.put_folder`), so
``serve`` never loads half an export. Its ``voxtral.json`` holds the codec record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from voxtral.codec import codec_info, load_codec
from voxtral.config import Config
from voxtral.interleave import decode_duplex_ids
from voxtral.layout import Layout
from voxtral.model import VOXTRAL_JSON, build_speech_lm, export_speech_lm
from voxtral.stages.train.sample import (
    generate_ids,
    prompt_from_window,
    tokens_for_seconds,
    user_continuation,
)
from voxtral.storage import TMP_PREFIX, Storage

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
    write prompt + continuation as a WAV (decoded with the codec) and a JSON note.

    One stream: a mono WAV of the model. Two streams: ``window`` is a chunk's whole stream,
    the user's slots after the prompt replay its user track (then silence) and only the
    model's are sampled; the WAV is stereo, the user left and the model right."""
    import soundfile as sf

    tc = cfg.train
    device = next(model.parameters()).device
    codec = load_codec(cfg.codec, device=device)
    prompt = prompt_from_window(layout, window, tc.prompt_seconds)
    n_new = tokens_for_seconds(layout, tc.sample_seconds)
    given = None
    if layout.streams == 2:
        silence = silence_frame(codec, layout.frames_per_group)
        given = user_continuation(layout, window, len(prompt), n_new, silence)
    new = generate_ids(model, layout, prompt, n_new, seed=tc.seed, given=given)
    ids = np.concatenate([prompt, new])
    codes, text, user = decode_duplex_ids(layout, ids)

    def audio(c: np.ndarray) -> np.ndarray:
        return codec.decode(torch.as_tensor(c)[None])[0, 0].float().cpu().numpy()

    wav = audio(codes)
    if layout.streams == 2:
        wav = np.stack([audio(user), wav], axis=1)  # [T, 2]: left the user, right the model
    sf.write(folder / SAMPLE_WAV, wav, codec.sample_rate, subtype="PCM_16")
    note = {
        **source,
        "prompt_s": (len(prompt) - 1) / layout.group_len * layout.group_s,
        "generated_s": len(new) / layout.group_len * layout.group_s,
        "sample_rate": codec.sample_rate,
        "channels": ["user", "model"] if layout.streams == 2 else ["model"],
        "text": tokenizer.decode(text),
        "ids": ids.tolist(),
    }
    (folder / SAMPLE_JSON).write_text(json.dumps(note))
    return note


@torch.no_grad()
def silence_frame(codec, frames: int) -> np.ndarray:
    """``[n_q]`` codes of digital silence: the last of ``frames + 1`` encoded frames of zeros,
    past the encoder's start-up, for a user who has stopped talking."""
    n = int(round((frames + 1) * codec.sample_rate / codec.frame_rate))
    codes = codec.encode(torch.zeros(1, 1, n, device=codec.device))
    return codes[0, :, -1].long().cpu().numpy()


def export_run(
    cfg: Config,
    checkpoint_folder: str,
    tag: str,
    prompt_window: np.ndarray | None,
    prompt_source: dict,
    extra: dict,
) -> str:
    """Consolidate, export to ``storage.root/models/<run_name>`` and add the sample."""
    storage = Storage(cfg.storage.root)
    model, tokenizer, layout = load_trained(cfg, consolidated_state_dict(checkpoint_folder, tag))
    if torch.cuda.is_available() and cfg.train.use_gpu:
        model.to("cuda")
    name = cfg.train.run_name
    # beside the target on a local disk, so publishing it is a rename, not a copy
    near = storage.makedirs("models") if storage.local else None
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=near))
    try:
        if cfg.train.sample_seconds > 0 and prompt_window is not None:
            write_sample(model, tokenizer, layout, cfg, prompt_window, staging, prompt_source)
        model.to("cpu", dtype=getattr(torch, cfg.model.dtype))
        meta = {"base": cfg.model.base, **extra}
        export_speech_lm(model, tokenizer, layout, staging, extra=meta, codec=codec_info(cfg.codec))
        storage.put_folder(f"models/{name}", staging, last=VOXTRAL_JSON)
        return storage.uri(storage.current(f"models/{name}"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
