"""Attention over packed rows (voxtral/stages/train/attention.py): the window boundaries
against the packer and transformers, and every kernel that runs on CPU against the ground
truth, each window run alone.

FlexAttention runs forward-only here (torch has no CPU backward for it; transformers
compiles it, so the first run of this file takes some seconds longer). flash-attn is not
installable on CPU; its varlen path is checked through a reference kernel registered with
transformers that consumes the same ``cu_seq_lens_*`` arguments flash-attn would.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import find_packed_sequence_indices

from tests.commands import ONE_STREAM_ENCODEC
from voxtral.config import DEFAULT_CONFIG, ConfigError, load_config
from voxtral.model import build_speech_lm
from voxtral.stages.train import attention as A
from voxtral.stages.train.data import collate, pack, row_windows
from voxtral.stages.train.loss import stream_loss, stream_weights

SEQ_LEN = 281  # 1 + 40 groups of 7 (one stream of EnCodec): 1.6 s of audio per row
ROWS = 2
VARLEN_REFERENCE = "voxtral_varlen_reference"


@pytest.fixture(scope="module")
def cfg():
    over = ["storage.root=/unused", f"train.seq_len={SEQ_LEN}", *ONE_STREAM_ENCODEC]
    return load_config(DEFAULT_CONFIG, over, env={})


@pytest.fixture(scope="module")
def built(cfg):
    """The training model, with every speech token given its own random embedding: fresh
    rows all start at the mean of the text rows, and identical tokens would hide a leak
    (attending to one more copy of the same value changes nothing)."""
    torch.manual_seed(0)
    model, _, layout = build_speech_lm(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, model.config.initializer_range)
    return model.eval(), layout


def packed_batch(layout, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows packed as in training from chunks of 0.3–0.8 s against rows of 1.6 s: several
    windows of different lengths per row, windows split across rows, padding at the end."""
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(12):
        seconds = float(rng.uniform(0.3, 0.8))
        frames = int(seconds * layout.frame_rate)
        codes = rng.integers(0, layout.vocab.codebook_size, (layout.vocab.n_q, frames))
        text = rng.integers(0, layout.vocab.text_size, int(seconds * 3))
        starts = np.sort(rng.uniform(0, seconds, len(text)))
        windows += row_windows(layout, codes, text, starts, SEQ_LEN)
    rows = list(pack(iter(windows), layout, SEQ_LEN, layout.vocab.text_pad))
    batch = collate(rows[:ROWS])
    assert all(r.windows >= 2 for r in rows[:ROWS]), "each row should hold several windows"
    return batch


def spans(position_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each window of a row, read off the position resets by hand."""
    starts = [0] + [t for t in range(1, len(position_ids)) if position_ids[t] == 0]
    return list(zip(starts, starts[1:] + [len(position_ids)], strict=True))


def logits_of(model, kernel: str, batch: dict, **extra) -> torch.Tensor:
    model.set_attn_implementation(kernel)
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(batch["input_ids"]),
            position_ids=torch.as_tensor(batch["position_ids"]),
            attention_mask=None,
            use_cache=False,
            **extra,
        ).logits


def kernel_kwargs(kernel: str, batch: dict) -> dict:
    """The varlen boundaries for the reference kernel, as the loop passes them to flash-attn."""
    if kernel != VARLEN_REFERENCE:
        return {}
    return A.varlen_kwargs(torch.as_tensor(batch["position_ids"]))


def alone(model, batch: dict) -> torch.Tensor:
    """Ground truth: every window of every row through the model on its own."""
    out = torch.zeros(*batch["input_ids"].shape, model.config.vocab_size)
    model.set_attn_implementation("eager")
    for b, pos in enumerate(batch["position_ids"]):
        for s, e in spans(pos):
            with torch.no_grad():
                out[b, s:e] = model(
                    input_ids=torch.as_tensor(batch["input_ids"][b : b + 1, s:e]), use_cache=False
                ).logits[0]
    return out


def varlen_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """What flash-attn's varlen kernel computes: rows flattened into one sequence, causal
    attention inside each ``cu_seq_lens_q`` segment. Fails if the boundaries do not arrive."""
    cu = kwargs["cu_seq_lens_q"]
    assert kwargs["cu_seq_lens_k"] is cu and attention_mask is None
    b, h, t, d = query.shape
    groups = h // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    q, k, v = (x.transpose(0, 1).reshape(h, b * t, d) for x in (query, k, v))
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert e - s <= kwargs["max_length_q"]
        out[:, s:e] = F.scaled_dot_product_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling
        )
    return out.reshape(h, b, t, d).permute(1, 2, 0, 3), None


AttentionInterface.register(VARLEN_REFERENCE, varlen_reference)


@pytest.fixture(scope="module")
def truth(built) -> torch.Tensor:
    model, layout = built
    return alone(model, packed_batch(layout))


# -- window boundaries ----------------------------------------------------------------------
def test_boundaries_are_the_packers_windows_and_transformers_sees_the_same(built):
    model, layout = built
    batch = packed_batch(layout)
    pos = torch.as_tensor(batch["position_ids"])
    docs = A.document_ids(pos)
    for b in range(ROWS):
        expected = np.concatenate(
            [np.full(e - s, i) for i, (s, e) in enumerate(spans(batch["position_ids"][b]))]
        )
        assert np.array_equal(docs[b].numpy(), expected)
    assert torch.equal(find_packed_sequence_indices(pos), docs)
    cu = A.cu_seqlens(pos)
    lengths = [e - s for b in range(ROWS) for s, e in spans(batch["position_ids"][b])]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == pos.numel()
    assert (cu[1:] - cu[:-1]).tolist() == lengths


def test_a_row_start_is_a_boundary_even_where_positions_run_on():
    pos = torch.tensor([[0, 1, 2, 0, 1], [2, 3, 4, 5, 6]])  # row 1 continues row 0's numbers
    assert A.cu_seqlens(pos).tolist() == [0, 3, 5, 10]
    assert A.document_ids(pos).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    kw = A.varlen_kwargs(pos)
    assert kw["max_length_q"] == kw["max_length_k"] == 5
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]


# -- kernels against the ground truth -------------------------------------------------------
@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex_attention", VARLEN_REFERENCE])
def test_every_kernel_gives_each_window_its_own_logits(built, truth, kernel):
    """Packed logits equal each window's logits alone (tight fp32 tolerance), so no token
    sees another window; the weighted loss is the same as the dense masked path's."""
    model, layout = built
    batch = packed_batch(layout)
    got = logits_of(model, kernel, batch, **kernel_kwargs(kernel, batch))
    torch.testing.assert_close(got, truth, rtol=0, atol=2e-5)
    weights = stream_weights(load_config(DEFAULT_CONFIG, env={}).train)
    labels, streams = torch.as_tensor(batch["labels"]), torch.as_tensor(batch["streams"])
    loss, _ = stream_loss(got, labels, streams, weights)
    dense, _ = stream_loss(logits_of(model, "sdpa", batch), labels, streams, weights)
    assert abs(float(loss) - float(dense)) < 1e-6, (kernel, float(loss), float(dense))


@pytest.mark.parametrize("kernel", ["sdpa", "flex_attention", VARLEN_REFERENCE])
def test_changing_one_window_changes_no_other(built, kernel):
    model, layout = built
    batch = packed_batch(layout, seed=1)
    extra = kernel_kwargs(kernel, batch)
    before = logits_of(model, kernel, batch, **extra)
    windows = spans(batch["position_ids"][0])
    for k, (s, e) in enumerate(windows[:2]):  # the first window and the one after it
        changed = {key: v.copy() for key, v in batch.items()}
        rng = np.random.default_rng(k)
        changed["input_ids"][0, s + 1 : e] = rng.integers(0, layout.vocab.size, e - s - 1)
        after = logits_of(model, kernel, changed, **extra)
        assert not torch.allclose(after[0, s + 1 : e], before[0, s + 1 : e], atol=1e-3)
        keep = torch.ones(SEQ_LEN, dtype=torch.bool)
        keep[s:e] = False
        torch.testing.assert_close(after[0, keep], before[0, keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)


def test_without_the_boundaries_the_varlen_kernel_would_leak(built, truth):
    """The check above can fail: one segment per row (what transformers infers for flash-attn
    on a batch of several rows) lets later windows see earlier ones."""
    model, layout = built
    batch = packed_batch(layout)
    t = batch["input_ids"].shape[1]
    rows_only = {
        "cu_seq_lens_q": (cu := torch.arange(0, ROWS * t + 1, t, dtype=torch.int32)),
        "cu_seq_lens_k": cu,
        "max_length_q": t,
        "max_length_k": t,
    }
    leaked = logits_of(model, VARLEN_REFERENCE, batch, **rows_only)
    assert not torch.allclose(leaked, truth, atol=1e-3)


# -- choosing a kernel ----------------------------------------------------------------------
def test_auto_is_sdpa_on_cpu_and_a_varlen_kernel_on_cuda(monkeypatch):
    assert A.resolve("auto", "cpu") == "sdpa"
    monkeypatch.setattr(A, "flash_attn_installed", lambda: False)
    assert A.resolve("auto", "cuda") == "flex"
    monkeypatch.setattr(A, "flash_attn_installed", lambda: True)
    assert A.resolve("auto", "cuda") == "flash_varlen"
    assert A.resolve("sdpa", "cuda") == "sdpa"


@pytest.mark.parametrize(
    "choice, device, says",
    [
        ("flex", "cpu", "no backward pass on cpu"),
        ("flash_varlen", "cpu", "CUDA GPUs only"),
        ("flash_varlen", "cuda", "flash-attn package is not installed"),
        ("paged", "cuda", "unknown attention"),
    ],
)
def test_a_kernel_that_cannot_run_says_why(built, monkeypatch, choice, device, says):
    monkeypatch.setattr(A, "flash_attn_installed", lambda: False)
    model, _ = built
    before = model.config._attn_implementation
    with pytest.raises(A.AttentionUnavailable, match=says):
        A.use_attention(model, choice, device)
    assert model.config._attn_implementation == before  # refused before touching the model


def test_use_attention_switches_the_model_and_packed_kwargs_follow_it(built):
    model, _ = built
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    assert A.use_attention(model, "auto", "cpu") == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert A.packed_kwargs(model, pos) == {}
    model.config._attn_implementation_internal = "flash_attention_2"  # as use_attention sets it
    try:
        assert A.packed_kwargs(model, pos)["cu_seq_lens_q"].tolist() == [0, 2, 5]
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("choice", ["flex", "flash_varlen"])
def test_a_gpu_kernel_without_use_gpu_is_a_config_error(choice):
    with pytest.raises(ConfigError, match="train.attention"):
        load_config(DEFAULT_CONFIG, ["storage.root=/unused", f"train.attention={choice}"], env={})
    cfg = load_config(
        DEFAULT_CONFIG,
        ["storage.root=/unused", f"train.attention={choice}", "train.use_gpu=true"],
        env={},
    )
    assert cfg.train.attention == choice
