"""Throughput accounting: model FLOPs per token and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs (forward + backward, no recomputation from gradient
checkpointing) over what the device could do: ``6·N`` per token for the matmul weights
(the LM head included, the input embedding excluded: it is a lookup) plus ``12·L·d·T`` for
attention scores and values at context ``T`` (the PaLM paper's accounting; with packed
windows the true context is shorter, so this is an upper bound on attention FLOPs).
"""

from __future__ import annotations

# Dense bf16 peaks (no sparsity), TFLOP/s per device, matched on the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
)


def numel(p) -> int:
    """Elements of a parameter, whole even when ZeRO-3 holds only a partition of it here."""
    return getattr(p, "ds_numel", None) or p.numel()


def param_count(model) -> int:
    return sum(numel(p) for p in model.parameters())


def local_param_count(model) -> int:
    """Elements this rank holds: its ZeRO-3 partition of a tensor, or the whole tensor."""
    return sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters()
    )


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding."""
    total = param_count(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - numel(emb)


def flops_per_token(model_config, n_matmul_params: int, context: int) -> float:
    """Training FLOPs (fwd + bwd) per token at attention context ``context``."""
    layers = model_config.num_hidden_layers
    d = model_config.hidden_size
    return 6.0 * n_matmul_params + 12.0 * layers * d * context


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (then MFU is not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s * flops_per_tok / peak
