"""The speech LM: the tiny Mistral folder through model.base, vocabulary resize, layer pruning,
gradient checkpointing, export → load round trip, and missing folders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from voxtral.config import DEFAULT_CONFIG, Config, ModelConfig, load_config
from voxtral.layout import Layout
from voxtral.model import (
    VOXTRAL_JSON,
    add_speech_tokens,
    build_speech_lm,
    export_speech_lm,
    layout_for,
    load_speech_lm,
    read_voxtral_json,
    resolve_base,
    tiny_mistral_dir,
    write_tiny_mistral,
)

TEXT_SIZE = 512  # the tiny model's vocabulary
LAYERS = 4


def cfg_with(*overrides: str) -> Config:
    return load_config(DEFAULT_CONFIG, ["storage.root=/unused", *overrides], env={})


@pytest.fixture(scope="module")
def base_path() -> str:
    return resolve_base(ModelConfig(base="tiny"))


@pytest.fixture(scope="module")
def base_model(base_path):
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()


def batch(layout: Layout, length: int = 29, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, layout.vocab.size, (2, length), generator=g)


def test_tiny_folder_loads_through_model_base(base_path, base_model):
    assert base_path == str(tiny_mistral_dir())
    assert (tiny_mistral_dir() / "config.json").is_file()
    assert base_model.config.vocab_size == TEXT_SIZE
    assert base_model.config.num_hidden_layers == LAYERS
    by_name, _, layout = build_speech_lm(cfg_with())
    by_path, tok, layout2 = build_speech_lm(cfg_with(f"model.base={base_path}"))
    assert layout == layout2 == layout_for(cfg_with())
    for (name, a), (_, b) in zip(
        by_name.state_dict().items(), by_path.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert tok.decode(tok("welcome back", add_special_tokens=False)["input_ids"]).strip() == (
        "welcome back"
    )


def test_tiny_folder_is_deterministic_and_written_anywhere(tmp_path, base_model):
    path = write_tiny_mistral(tmp_path / "new" / "nested" / "tiny")  # parents do not exist yet
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tiny"]  # no temporary left beside it
    other = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for (name, a), (_, b) in zip(
        other.state_dict().items(), base_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert write_tiny_mistral(path) == path  # already there: kept as is


def test_writing_the_tiny_model_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    write_tiny_mistral(tmp_path / "tiny", layers=1)  # seeds its own init, in a forked RNG
    assert torch.equal(torch.rand(4), expected)


def test_resized_vocabulary_and_forward(base_model):
    model, _, layout = build_speech_lm(cfg_with())
    v = layout.vocab
    assert (v.text_size, v.n_q, v.codebook_size) == (TEXT_SIZE, 2, 2048)  # the tiny Mimi
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == v.padded_size == model.config.vocab_size
    assert v.padded_size % 64 == 0 and v.padded_size >= v.size
    old_emb = base_model.get_input_embeddings().weight
    old_head = base_model.get_output_embeddings().weight
    torch.testing.assert_close(emb[:TEXT_SIZE], old_emb)  # base rows untouched
    torch.testing.assert_close(head[:TEXT_SIZE], old_head)
    # every new row (audio, specials, padding) starts at the mean of the base rows
    torch.testing.assert_close(
        emb[TEXT_SIZE:], old_emb.mean(0).expand(v.padded_size - TEXT_SIZE, -1)
    )
    torch.testing.assert_close(head[TEXT_SIZE:], old_head.mean(0).expand_as(head[TEXT_SIZE:]))
    ids = batch(layout)
    ids[:, 0] = v.bos
    ids[:, -1] = v.eos
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, ids.shape[1], v.padded_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_add_speech_tokens_checks_the_base_vocabulary(base_path):
    model = AutoModelForCausalLM.from_pretrained(base_path)
    wrong = layout_for(cfg_with())
    wrong = Layout.from_dict(
        {**wrong.to_dict(), "vocab": {**wrong.to_dict()["vocab"], "text_size": 1000}}
    )
    with pytest.raises(ValueError, match="model has 512 embedding rows, layout expects 1000"):
        add_speech_tokens(model, wrong)


def test_dtype_from_config():
    model, _, _ = build_speech_lm(cfg_with("model.dtype=bfloat16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("keep_every", "kept"), [(2, [0, 2]), (3, [0, 3]), (8, [0])])
def test_pruning_keeps_every_kth_layer(base_model, keep_every, kept):
    model, _, layout = build_speech_lm(cfg_with(f"model.keep_every={keep_every}"))
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == len(kept)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(kept)))
    for layer, src in zip(layers, kept, strict=True):
        ref = base_model.model.layers[src]
        assert torch.equal(layer.self_attn.q_proj.weight, ref.self_attn.q_proj.weight)
        assert torch.equal(layer.mlp.down_proj.weight, ref.mlp.down_proj.weight)
    out = model(input_ids=batch(layout))
    assert out.logits.shape[-1] == layout.vocab.padded_size


@torch.no_grad()
def test_pruned_model_generates_with_kv_cache():
    model, _, layout = build_speech_lm(cfg_with("model.keep_every=2"))
    model.eval()
    prompt = torch.tensor([[layout.vocab.bos, 5, 600, 1700, 17, 900]])
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    # the same greedy decoding without a cache: full forward passes over the whole prefix
    ids = prompt
    for _ in range(12):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)
    # step by step with an explicit cache: the cache holds one entry per kept layer
    out = model(prompt, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert len(cache.layers if hasattr(cache, "layers") else cache) == 2
    assert cache.get_seq_length() == prompt.shape[1]


class CountCalls:
    """Counts a module's forward calls (module hooks do not see checkpoint recomputation)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.forward, self.calls = module, module.forward, 0
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.forward(*args, **kwargs)

    def remove(self) -> None:
        del self.module.forward


def _mlp_calls_in_train_step(model, ids) -> tuple[int, dict]:
    """Layer 1's MLP calls in one forward and backward, in the mode the model is in."""
    counter = CountCalls(model.model.layers[1].mlp)
    try:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        counter.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return counter.calls, grads


def test_gradient_checkpointing_recomputes_in_training():
    plain, _, layout = build_speech_lm(cfg_with())
    ckpt, _, _ = build_speech_lm(cfg_with("model.gradient_checkpointing=true"))
    assert ckpt.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    assert ckpt.config.use_cache is False  # a cache cannot be checkpointed
    ids = batch(layout)
    # Built models come back in eval mode (from_pretrained's): checkpointing is switched on
    # but does nothing until someone calls train(). train_loop does (tested through the
    # loop in test_train.py::test_train_loop_trains_in_training_mode_from_the_first_step).
    assert not plain.training and not ckpt.training
    n_built, _ = _mlp_calls_in_train_step(ckpt, ids)
    assert n_built == 1
    plain.train()
    ckpt.train()
    n_plain, g_plain = _mlp_calls_in_train_step(plain, ids)
    n_ckpt, g_ckpt = _mlp_calls_in_train_step(ckpt, ids)
    assert n_plain == 1
    assert n_ckpt == 2  # forward, then recomputed during backward: checkpointing is active
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:  # and it computes the same gradients
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6)
    # outside training nothing is recomputed
    ckpt.eval()
    counter = CountCalls(ckpt.model.layers[1].mlp)
    with torch.no_grad():
        ckpt(input_ids=ids)
    counter.remove()
    assert counter.calls == 1


def test_export_load_round_trip(tmp_path):
    cfg = cfg_with("model.keep_every=2", "model.gradient_checkpointing=true")
    model, tok, layout = build_speech_lm(cfg)
    model.eval()
    folder = export_speech_lm(model, tok, layout, tmp_path / "export", extra={"step": 30})
    assert (folder / "model.safetensors").is_file() and (folder / VOXTRAL_JSON).is_file()
    meta = json.loads((folder / VOXTRAL_JSON).read_text())
    assert meta["format"] == 1 and meta["step"] == 30
    assert meta["layout"]["vocab"]["specials"]["<eos>"] == layout.vocab.eos
    loaded, tok2, layout2, meta2 = load_speech_lm(folder)
    assert layout2 == layout and meta2 == meta == read_voxtral_json(folder)
    assert not loaded.training and loaded.config.num_hidden_layers == 2
    assert loaded.config.use_cache  # serving needs the KV cache even if training had it off
    ids = batch(layout)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    text = "so what do you think"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    with torch.no_grad():
        gen = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(FileNotFoundError, match="no model folder") as err:
        resolve_base(ModelConfig(base=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.base './no-such-model'"):
        build_speech_lm(cfg_with("model.base=./no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model folder"):
        resolve_base(ModelConfig(base=str(tmp_path / "empty")))
    # a Hub id is passed through untouched (nothing is downloaded here)
    assert (
        resolve_base(ModelConfig(base="mistralai/Mistral-7B-v0.3")) == "mistralai/Mistral-7B-v0.3"
    )


def test_load_speech_lm_needs_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Voxtral model folder"):
        load_speech_lm(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not a Voxtral model folder"):
        load_speech_lm(tiny_mistral_dir())  # a base model, not an export
