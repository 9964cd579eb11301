"""Attention over packed rows: which kernel a training run uses, and the window boundaries
that kernel needs.

A packed row holds several windows (see :mod:`voxtral.stages.train.data`), each with
positions restarting at 0; no token may attend to another window. The kernels
(``train.attention``):

- ``sdpa``: transformers reads the position resets as window boundaries and builds a dense
  block-diagonal causal mask; torch's scaled-dot-product attention then computes every
  query × key pair of the row and masks most of them away. Correct everywhere (the CPU
  path), but it pays for the whole ``T²`` and cannot use the flash kernel.
- ``flex``: FlexAttention (``torch.nn.attention.flex_attention``) through transformers'
  ``flex_attention``: the same boundaries become a :class:`BlockMask` (a document mask),
  and blocks between windows are skipped, not computed. CUDA only for training: torch has
  no FlexAttention backward on CPU.
- ``flash_varlen``: flash-attn's varlen kernel over the windows, through transformers'
  ``flash_attention_2``. It needs the window boundaries as cumulative lengths over the
  flattened batch (:func:`varlen_kwargs`): transformers only infers them itself for a
  batch of one row, and with more rows would silently run plain causal attention across
  windows. CUDA and the ``flash-attn`` package.
- ``auto``: ``flash_varlen`` when flash-attn is installed, else ``flex``, on CUDA; ``sdpa``
  on CPU.

The boundary math is pure (:func:`window_starts`, :func:`document_ids`,
:func:`cu_seqlens`), so tests pin it against the packer and against transformers.
"""

from __future__ import annotations

import importlib.util

import torch

CHOICES = ("auto", "sdpa", "flex", "flash_varlen")
HF_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "flex_attention", "flash_varlen": "flash_attention_2"}
"""``train.attention`` → transformers' ``attn_implementation``."""


class AttentionUnavailable(RuntimeError):
    """The chosen attention kernel cannot run here (device or package)."""


# -- window boundaries (pure) ------------------------------------------------------------------
def window_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: where a window starts. The first token of a row, and every token whose
    position does not continue the one before it (the packer restarts each window, and the
    padding, at 0). The same rule transformers uses to find packed sequences."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the index of each token's window within its row (0, 0, …, 1, 1, …)."""
    return window_starts(position_ids).cumsum(-1) - 1


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[windows + 1]``: cumulative window lengths over the flattened batch (rows one
    after another), the layout flash-attn's varlen kernels take. Row starts are always
    boundaries, so no window runs from one row into the next."""
    starts = window_starts(position_ids).flatten().nonzero().flatten()
    end = torch.tensor([position_ids.numel()], device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The keyword arguments that make transformers' ``flash_attention_2`` run flash-attn's
    varlen kernel over the windows of every row. Computed on the host (``nonzero`` needs the
    values there anyway) and moved to the device once per forward, not once per layer."""
    cu = cu_seqlens(position_ids.detach().cpu())
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(position_ids.device, non_blocking=True)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


# -- choosing a kernel -------------------------------------------------------------------------
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def unavailable(choice: str, device_type: str) -> str | None:
    """Why ``choice`` cannot train on ``device_type`` here, or None when it can."""
    if choice not in CHOICES:
        return f"unknown attention {choice!r} (one of {', '.join(CHOICES)})"
    if choice in ("auto", "sdpa"):
        return None
    if device_type != "cuda":
        if choice == "flex":
            return (
                f"FlexAttention has no backward pass on {device_type} in torch "
                f"{torch.__version__}; use sdpa (or auto) off CUDA"
            )
        return "flash-attn's kernels run on CUDA GPUs only; use sdpa (or auto) off CUDA"
    if choice == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if choice == "flash_varlen" and not flash_attn_installed():
        return (
            "the flash-attn package is not installed: `uv pip install flash-attn "
            "--no-build-isolation` (built for this torch and CUDA), or use flex"
        )
    return None


def resolve(choice: str, device_type: str) -> str:
    """``train.attention`` → the kernel this device runs: ``sdpa``, ``flex`` or
    ``flash_varlen``. Raises :class:`AttentionUnavailable` naming why it cannot run."""
    if choice == "auto":
        if device_type != "cuda":
            return "sdpa"
        return "flash_varlen" if flash_attn_installed() else "flex"
    reason = unavailable(choice, device_type)
    if reason is not None:
        raise AttentionUnavailable(f"train.attention={choice}: {reason}")
    return choice


def use_attention(model, choice: str, device_type: str) -> str:
    """Switch ``model`` (a transformers causal LM) to the kernel for ``choice``; returns the
    kernel's name. Call before ``deepspeed.initialize``."""
    kernel = resolve(choice, device_type)
    model.set_attn_implementation(HF_IMPLEMENTATION[kernel])
    return kernel


def packed_kwargs(model, position_ids: torch.Tensor) -> dict:
    """Extra forward arguments for a packed batch under ``model``'s kernel: the varlen
    boundaries for flash-attn; nothing for sdpa and flex, which read the position resets."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == HF_IMPLEMENTATION["flash_varlen"]:
        return varlen_kwargs(position_ids)
    return {}
