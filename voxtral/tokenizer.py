"""The multimodal tokenizer: a codec and a text tokenizer bound to one layout
(:mod:`voxtral.layout`), and timed words → base-tokenizer ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from voxtral.audio import prepare
from voxtral.codec import Codec
from voxtral.interleave import decode_ids, encode_ids
from voxtral.layout import Layout, LayoutError


# -- text ------------------------------------------------------------------------------
def timed_text_ids(tokenizer, words: Sequence[dict] | None) -> tuple[list[int], list[float]]:
    """Timed words ``{word, start_s}`` → base-tokenizer ids, each timed at its word's start.

    Words are put in time order first and blank ones dropped, so the ids are time-ordered
    whatever the source did. They are tokenized as one string (so sub-word merges match how
    the base model saw text) and each token is mapped back to its word by character offsets.
    """
    words = sorted(
        (
            {**w, "word": w["word"].strip()}
            for w in words or ()
            if w and (w.get("word") or "").strip()
        ),
        key=lambda w: float(w["start_s"]),
    )
    if not words:
        return [], []
    text, spans = "", []
    for w in words:
        if text:
            text += " "
        spans.append((len(text), len(text) + len(w["word"]), float(w["start_s"])))
        text += w["word"]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts, j = [], [], 0
    # a zero-width offset is a real token too (byte-level BPE's lone "Ġ" before a word it
    # cannot merge with): it belongs to the word that follows, never dropped
    for tid, (a, _b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        while j + 1 < len(spans) and a >= spans[j][1]:
            j += 1
        ids.append(int(tid))
        starts.append(spans[j][2])
    return ids, starts


# -- codec + text tokenizer + layout ---------------------------------------------------
class MultimodalTokenizer:
    """Audio (any rate, any channels) + timed words ⇄ id streams of one layout."""

    def __init__(self, codec: Codec, text_tokenizer, layout: Layout):
        if (codec.name, codec.n_q) != (layout.codec, layout.vocab.n_q):
            raise LayoutError(
                f"layout is for {layout.codec} n_q={layout.vocab.n_q}, "
                f"codec is {codec.name} n_q={codec.n_q}"
            )
        self.codec, self.text_tokenizer, self.layout = codec, text_tokenizer, layout

    def encode_audio(self, wav, sample_rate: int) -> np.ndarray:
        """Audio → codes ``[n_q, F]``, after down-mix and resampling to the codec rate."""
        x = prepare(wav, sample_rate, self.codec.sample_rate)
        return self.codec.encode(x[None, None]).squeeze(0).cpu().numpy()

    def encode(self, wav, sample_rate: int, words: list[dict] | None = None) -> np.ndarray:
        codes = self.encode_audio(wav, sample_rate)
        ids, starts = timed_text_ids(self.text_tokenizer, words)
        return encode_ids(self.layout, codes, np.asarray(ids), np.asarray(starts))

    def decode(self, ids, start: int = 0) -> tuple[np.ndarray, str]:
        """Ids → (mono audio at the codec rate, transcript); best effort for any ids."""
        codes, text = decode_ids(self.layout, ids, start)
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32), self.text_tokenizer.decode(text)
        wav = self.codec.decode(torch.as_tensor(codes)[None])
        return wav[0, 0].float().cpu().numpy(), self.text_tokenizer.decode(text)
