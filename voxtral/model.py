"""The speech LM: a Mistral-style causal LM with audio and special tokens added.

One loading path for every size: ``model.base`` is a Hugging Face id, a local folder, or
``tiny`` (a tiny random Mistral folder written once by :func:`write_tiny_mistral`), so tests
and the local profile exercise exactly the code that loads Mistral-7B.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from voxtral.codec import CodecInfo, codec_info
from voxtral.config import Config, ModelConfig
from voxtral.layout import Layout, make_layout
from voxtral.storage import publish_pretrained

TINY = "tiny"
TINY_VERSION = 1
VOXTRAL_JSON = "voxtral.json"

_TINY_TEXT = """\
so what do you think about that i mean it is a really good question and honestly i am not
sure yes well we talked about this last week on the show and people wrote in to tell us
they disagreed right okay let us start from the beginning then welcome back everyone to
another episode today we have a very special guest with us thank you for having me it is
a pleasure to be here how did you get started in this field it was almost by accident
really i was studying something else entirely and a friend asked me to help with a project
that sounds amazing tell me more about the project what were you trying to build we wanted
to understand how people talk to each other when nobody is listening the pauses the little
laughs the way two voices overlap and then take turns that is the music of conversation
exactly and most systems throw all of that away when they turn speech into text first
"""


def tiny_mistral_dir() -> Path:
    """Where the tiny model lives on this machine (deterministic, so every node agrees)."""
    return Path(tempfile.gettempdir()) / f"voxtral-tiny-mistral-v{TINY_VERSION}"


def write_tiny_mistral(path: str | os.PathLike, vocab_size: int = 512, layers: int = 4) -> Path:
    """Write a tiny random-init Mistral folder with a byte-level BPE tokenizer.

    Deterministic (fixed seed), written to a temporary folder and published into place.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").exists():
        return path
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_TEXT.split("\n"), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    return publish_pretrained(path, model, tok)


def resolve_base(cfg: ModelConfig) -> str:
    """``model.base`` as something ``from_pretrained`` accepts (writes the tiny model once)."""
    if cfg.base == TINY:
        return str(write_tiny_mistral(tiny_mistral_dir()))
    p = Path(cfg.base).expanduser()
    looks_local = cfg.base.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.base {cfg.base!r}: no model folder (config.json) there")
    return str(p) if looks_local else cfg.base


def load_text_tokenizer(base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def base_text_size(base: str) -> int:
    """Rows of the base model's embedding: the text part of the vocabulary."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base).vocab_size


def layout_for(cfg: Config, text_size: int | None = None) -> Layout:
    """The layout of a pipeline config (base vocabulary + codec + tokenizer section);
    ``text_size`` is the base vocabulary when the caller has the model loaded already."""
    if text_size is None:
        text_size = base_text_size(resolve_base(cfg.model))
    return make_layout(codec_info(cfg.codec), text_size, cfg.tokenizer)


def prune_layers(model, keep_every: int):
    """Keep every ``keep_every``-th decoder layer (the hackathon's way to fit one GPU)."""
    if keep_every == 1:
        return model
    layers = model.model.layers
    kept = torch.nn.ModuleList(layers[i] for i in range(0, len(layers), keep_every))
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by it
    model.model.layers = kept
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[::keep_every][: len(kept)]
    return model


@torch.no_grad()
def add_speech_tokens(model, layout: Layout):
    """Resize embeddings (and the LM head) to ``layout.vocab.padded_size``; new rows start at
    the mean of the base rows, so the new tokens begin as an "average word" rather than noise
    whose norm would swamp the pretrained ones. Works on ZeRO-3-partitioned weights too."""
    old = model.config.vocab_size
    if old != layout.vocab.text_size:
        raise ValueError(f"model has {old} embedding rows, layout expects {layout.vocab.text_size}")
    model.resize_token_embeddings(layout.vocab.padded_size, mean_resizing=False)
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is None:
            continue
        bias = getattr(emb, "bias", None)
        with _gathered([emb.weight] + ([bias] if bias is not None else [])):
            w = emb.weight
            w[old:] = w[:old].mean(dim=0, keepdim=True)
            if bias is not None:
                bias[old:] = bias[:old].mean()
    return model


def _gathered(params: list[torch.nn.Parameter]):
    """Whole tensors for in-place edits: ZeRO-3 gathers them, edits on rank 0 and scatters
    the result back; ordinary parameters need nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def enable_gradient_checkpointing(model):
    """Checkpointing that transformers honours: non-reentrant (no input-grad hack needed),
    the KV cache off (incompatible), and only active while ``model.training``."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def build_speech_lm(cfg: Config, dtype: torch.dtype | None = None, ds_config: dict | None = None):
    """Base LM → speech LM for the pipeline config. Returns (model, text tokenizer, layout).

    With a ZeRO-3 ``ds_config`` (inside an initialised process group) the weights are
    partitioned as they load (``deepspeed.zero.Init`` through transformers): no worker ever
    holds the whole model, which is what lets 8 GPUs load a model none could hold alone.
    """
    from transformers import AutoModelForCausalLM

    base = resolve_base(cfg.model)
    dtype = dtype or getattr(torch, cfg.model.dtype)
    with _zero3_loading(ds_config):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        tokenizer = load_text_tokenizer(base)
        layout = layout_for(cfg, model.config.vocab_size)
        prune_layers(model, cfg.model.keep_every)
        add_speech_tokens(model, layout)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer, layout


@contextlib.contextmanager
def _zero3_loading(ds_config: dict | None):
    """Tell transformers that ZeRO-3 is on while the model loads and resizes (it holds the
    setting through a weak reference to this object, so it must stay alive until then)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds


def save_voxtral_json(
    folder: str | os.PathLike,
    layout: Layout,
    extra: dict | None = None,
    codec: CodecInfo | None = None,
) -> None:
    """``voxtral.json``: the layout, the codec record (``codec``, which serving rebuilds the
    codec from; see :func:`voxtral.codec.model_codec`) and the caller's extra fields."""
    data = {"format": 1, "layout": layout.to_dict(), **(extra or {})}
    if codec is not None:
        data["codec"] = codec.to_dict()
    Path(folder, VOXTRAL_JSON).write_text(json.dumps(data, indent=2, sort_keys=True))


def read_voxtral_json(folder: str | os.PathLike) -> dict:
    p = Path(folder, VOXTRAL_JSON)
    if not p.is_file():
        raise FileNotFoundError(f"{folder}: not a Voxtral model folder (no {VOXTRAL_JSON})")
    return json.loads(p.read_text())


def export_speech_lm(
    model,
    tokenizer,
    layout: Layout,
    folder: str | os.PathLike,
    extra: dict | None = None,
    codec: CodecInfo | None = None,
) -> Path:
    """A Hugging Face folder (safetensors + tokenizer) plus ``voxtral.json`` (with ``codec``,
    the record of the codec that made the training codes, when given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_voxtral_json(folder, layout, extra, codec)
    return folder


def load_speech_lm(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """An exported folder → (model, text tokenizer, layout, voxtral.json contents)."""
    from transformers import AutoModelForCausalLM

    meta = read_voxtral_json(folder)
    layout = Layout.from_dict(meta["layout"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    model.config.use_cache = True  # an export of a checkpointed run saved it off
    return model, load_text_tokenizer(str(folder)), layout, meta
