"""Model shapes the benchmarks build with random weights, so no weights are downloaded.

The transformer body only (width, depth, heads); each bench adds the vocabulary it needs
(training: Mistral's 32,768 text ids, so the LM head costs what it will; serving: the tiny
model's tokenizer). ``7b`` is Mistral-7B-v0.3's config, written out; ``prune`` keeps every
k-th layer of a shape, as ``model.keep_every`` does to a loaded model.
"""

from __future__ import annotations

MISTRAL_VOCAB = 32_768  # Mistral-7B-v0.3's text vocabulary

SHAPES: dict[str, dict] = {
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # ~1B with Mistral's vocabulary: 18 layers of d=2048, GQA 16/8 heads
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    # mistralai/Mistral-7B-v0.3 config.json
    "7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
    ),
}


def prune(shape: dict, keep_every: int) -> dict:
    """The shape with every ``keep_every``-th layer kept (``ceil(layers / k)`` layers)."""
    return {**shape, "num_hidden_layers": -(-shape["num_hidden_layers"] // keep_every)}


def mistral_config(shape: str, vocab_size: int, keep_every: int = 1, **extra):
    """A ``MistralConfig`` of ``shape`` (full attention, no sliding window, as v0.3);
    ``extra`` overrides any field."""
    from transformers import MistralConfig

    fields = dict(
        vocab_size=vocab_size,
        max_position_embeddings=32_768,
        sliding_window=None,
        tie_word_embeddings=False,
        **prune(SHAPES[shape], keep_every),
    )
    return MistralConfig(**{**fields, **extra})
