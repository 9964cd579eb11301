"""The bf16 + fp32-master path, checked on a live DeepSpeed engine (``bench/train.py
--check-precision``).

On GPU the model computes in bf16 and ZeRO keeps fp32 master weights in the optimizer; the
export must hold those masters, not the bf16 copies. After some real steps this reads:

- ``module_dtype`` / ``master_dtype``: the module's parameters and DeepSpeed's masters
  (``safe_get_full_fp32_param``, whole even on ZeRO-3);
- ``module_is_rounded_master``: every module parameter is exactly its master rounded to the
  module dtype (the copy DeepSpeed makes after each step);
- ``export_round_trip``: the pipeline's export path gives back the masters bit for bit:
  ``save_checkpoint`` → :func:`voxtral.stages.train.export.consolidated_state_dict` (zero_to_fp32)
  → :func:`voxtral.model.export_speech_lm` → :func:`voxtral.model.load_speech_lm`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def master_weights(engine) -> dict[str, torch.Tensor]:
    """name → DeepSpeed's full fp32 master of every trained parameter, on the host."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is None:
            raise RuntimeError(f"{name}: DeepSpeed holds no master weight for it")
        out[name] = master.detach().cpu()
    return out


def module_matches_masters(engine, masters: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(module dtype, whether every parameter equals its master rounded to that dtype)."""
    import deepspeed

    dtypes, same = set(), True
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):  # ZeRO-3: the whole tensor for a moment
            full = p.detach().cpu()
        dtypes.add(str(full.dtype).removeprefix("torch."))
        same = same and torch.equal(masters[name].to(full.dtype), full)
    return ",".join(sorted(dtypes)), same


def export_round_trip(engine, masters: dict[str, torch.Tensor], layout, tokenizer) -> bool:
    """Checkpoint, consolidate and export as the pipeline does; True when the exported
    folder loads back with exactly the masters."""
    from voxtral.model import export_speech_lm, load_speech_lm
    from voxtral.stages.train.export import consolidated_state_dict

    folder = Path(tempfile.mkdtemp(prefix="voxtral-precision-"))
    try:
        engine.save_checkpoint(str(folder / "ckpt"), tag="precision", save_latest=False)
        state = consolidated_state_dict(str(folder / "ckpt"), "precision")
        if any(not torch.equal(state[n], m.float()) for n, m in masters.items()):
            return False
        with torch.device("meta"):  # no random init of a model about to be overwritten
            fresh = type(engine.module)(engine.module.config)
        fresh.to_empty(device="cpu").load_state_dict(state, strict=True)
        export_speech_lm(fresh, tokenizer, layout, folder / "export")
        loaded, *_ = load_speech_lm(folder / "export", dtype=torch.float32)
        back = dict(loaded.named_parameters())
        return all(torch.equal(back[n], m.float()) for n, m in masters.items())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(engine, layout, tokenizer) -> dict:
    """The figures above, as JSON-ready values."""
    masters = master_weights(engine)
    module_dtype, rounded = module_matches_masters(engine, masters)
    master_dtypes = sorted({str(m.dtype).removeprefix("torch.") for m in masters.values()})
    return {
        "module_dtype": module_dtype,
        "master_dtype": ",".join(master_dtypes),
        "module_is_rounded_master": rounded,
        "export_round_trip": export_round_trip(engine, masters, layout, tokenizer),
    }
