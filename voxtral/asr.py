"""Speech recognition: Whisper's words with their times, and the language, for each chunk.

One loading path for every size, like :mod:`voxtral.model`: ``text.asr_model`` is a Hugging
Face id (``openai/whisper-large-v3-turbo``), a local folder, or ``tiny`` (a tiny random
Whisper folder written once by :func:`write_tiny_whisper`: its words are nonsense, but
batching, language detection, word times and everything downstream run for real).

**Why ``generate`` and not the ASR pipeline.** Preprocess already holds the chunks as a
batch; the pipeline would split it back into single samples for its pre- and
post-processing and needs a second language pass. Here one batch goes through
:meth:`Transcriber.transcribe` as: log-mel features (padded to Whisper's 30 s window, with an
attention mask that marks each chunk's own frames), the encoder once, the language read off
that encoder output (``detect_language``), then greedy ``generate`` with
``return_token_timestamps`` (cross-attention DTW over the generation config's
``alignment_heads``, cropped to each chunk's own frames), and tokens grouped into words.

**Mixed lengths.** Whisper always sees 30 s: a short chunk is zero-padded to the window, the
same whether it is alone or in a batch, so batching does not change what the model sees (the
tests compare a batch of mixed lengths with one-by-one). A chunk longer than 30 s is cut into
30 s windows, transcribed as separate items and joined with their offsets.

**Times.** DTW gives each token the encoder frame (20 ms) where the text "jumps" to it; a
word starts at its first token's time and ends at the next token's (the first token's time
is where the DTW path starts, 0 s: transformers' estimate, as OpenAI's). :func:`repair_times`
then guarantees what consumers rely on: every time inside ``[0, duration]``, starts and ends
non-decreasing, each word's end at or after its start.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxtral.audio import prepare
from voxtral.storage import publish_pretrained

TINY = "tiny"
TINY_VERSION = 1
WHISPER_RATE = 16_000
"""Whisper's input rate."""
WINDOW_S = 30.0
"""Whisper's window: the encoder always sees this much audio."""
TIME_PRECISION = 0.02
"""Seconds per encoder frame: the resolution of the DTW word times."""
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
"""Languages written without spaces between words: a word is each whole character there."""
_SPACE = "\u0120"  # byte-level BPE's spelling of a leading space ("Ġ")

_TINY_TEXT = """\
so what do you think about that i mean it is a really good question and honestly i am not
sure yes well we talked about this last week on the show and people wrote in to tell us
they disagreed right okay let us start from the beginning then welcome back everyone
"""
_TINY_LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pt", "ja", "zh")
"""The tiny model's languages (the real models have about a hundred)."""


@dataclass(frozen=True)
class Transcript:
    """One chunk's recognition: timed words ``{word, start_s, end_s}`` (chunk-relative, the
    caption word structure) and the detected language (ISO code, e.g. ``"en"``)."""

    words: list[dict] = field(default_factory=list)
    language: str | None = None


# -- pure functions ------------------------------------------------------------------------
def word_spans(pieces: Sequence[str], language: str | None = None) -> list[tuple[int, int]]:
    """Byte-level token strings → ``(first, end)`` token index ranges, one per word.

    A word starts at a token that begins with a space (byte-level ``Ġ``); punctuation and
    word pieces without one stay with the word before. In languages written without spaces
    (:data:`NO_SPACE_LANGUAGES`) every token starts a word (:func:`words_from_tokens` then
    joins tokens that hold only part of a character)."""
    spans: list[tuple[int, int]] = []
    for i, piece in enumerate(pieces):
        starts = not spans or piece.startswith(_SPACE) or language in NO_SPACE_LANGUAGES
        if starts:
            spans.append((i, i + 1))
        else:
            spans[-1] = (spans[-1][0], i + 1)
    return spans


def repair_times(words: Sequence[dict], duration_s: float) -> list[dict]:
    """Words with times that hold what consumers rely on: each time clamped into
    ``[0, duration_s]``, starts non-decreasing, ends non-decreasing and never before their
    start. DTW is monotone already; this guards the edges (the crop to the chunk's frames
    rounds to 20 ms, the last token has no attention of its own) and NaNs."""
    out, last_start, last_end = [], 0.0, 0.0
    top = max(0.0, float(duration_s))
    for w in words:
        start = _clamp(w["start_s"], 0.0, top)
        end = _clamp(w["end_s"], 0.0, top)
        start = max(start, last_start)
        end = max(end, start, last_end)
        out.append({**w, "start_s": start, "end_s": end})
        last_start, last_end = start, end
    return out


def _clamp(x: float, lo: float, hi: float) -> float:
    x = float(x)
    return lo if math.isnan(x) else min(max(x, lo), hi)


def windows(n_samples: int, rate: int, window_s: float = WINDOW_S) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of at most ``window_s`` covering ``n_samples`` (one
    range for a chunk that fits, as every chunk of ``scrape.max_chunk_s`` <= 30 s does)."""
    step = int(window_s * rate)
    return [(a, min(a + step, n_samples)) for a in range(0, max(n_samples, 1), step)]


# -- the tiny model ------------------------------------------------------------------------
def tiny_whisper_dir() -> Path:
    """Where the tiny Whisper lives on this machine (deterministic, so every node agrees)."""
    return Path(tempfile.gettempdir()) / f"voxtral-tiny-whisper-v{TINY_VERSION}"


def write_tiny_whisper(path: str | os.PathLike, bpe_size: int = 400) -> Path:
    """Write a tiny random-init Whisper folder: model, generation config, a byte-level BPE
    Whisper tokenizer with Whisper's special and timestamp tokens, and the feature
    extractor. Deterministic (fixed seed), written aside and published into place.

    The generation config carries what ``generate`` needs for language detection and word
    times: ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id``, ``alignment_heads``.
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tok, ids = _tiny_whisper_tokenizer(bpe_size)
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        decoder_layers=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=[eot],
        suppress_tokens=[],
        init_std=0.5,  # random logits that differ from frame to frame: varied "words"
    )
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=448,
        begin_suppress_tokens=[eot],
        suppress_tokens=[],
        is_multilingual=True,
        lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in _TINY_LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        alignment_heads=[[0, 1], [1, 0], [1, 2]],
        forced_decoder_ids=None,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = gen
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok)
    return publish_pretrained(path, model, processor)


def _tiny_whisper_tokenizer(bpe_size: int):
    """A byte-level BPE Whisper tokenizer trained on a few lines, with Whisper's special and
    timestamp tokens in Whisper's order; and the ids of the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_TEXT.split("\n"), trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m) for m in _bpe_merges(bpe)]
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    # Whisper's order: <|endoftext|> right after the BPE vocabulary, then the special
    # tokens, <|notimestamps|> last of them, then the timestamp tokens (not special).
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in _TINY_LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([f"<|{i * TIME_PRECISION:.2f}|>" for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    return tok, ids


def _bpe_merges(bpe) -> list[list[str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else list(m) for m in merges]


def resolve_asr_model(name: str) -> str:
    """``text.asr_model`` as something ``from_pretrained`` accepts (writes the tiny model
    once)."""
    if name == TINY:
        return str(write_tiny_whisper(tiny_whisper_dir()))
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise FileNotFoundError(f"text.asr_model {name!r}: no model folder (config.json) there")
    return str(p) if looks_local else name


def words_from_tokens(
    tokenizer, ids: Sequence[int], times: Sequence[float], language: str | None = None
) -> list[dict]:
    """Text token ids and their DTW times → timed words ``{word, start_s, end_s}``.

    A word starts at its first token's time and ends at the time of the token after it
    (``times`` may be one longer than ``ids``: the end-of-text token's time ends the last
    word). A span whose text ends in half a character (``\\ufffd``) takes the next span in;
    bytes that still make no character are dropped. Times are not repaired here (see
    :func:`repair_times`)."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    words: list[dict] = []
    first = None
    for a, b in word_spans(pieces, language):
        first = a if first is None else first
        text = tokenizer.decode(list(ids[first:b]))
        if text.endswith("\ufffd") and b < len(ids):
            continue
        end_at = b if b < len(times) else len(times) - 1
        text = text.replace("\ufffd", "")  # bytes that never made a character: noise
        if text.strip():
            start, end = float(times[first]), float(times[end_at])
            words.append({"word": text.strip(), "start_s": start, "end_s": end})
        first = None
    return words


# -- the model -----------------------------------------------------------------------------
def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (Whisper is trained in half precision), float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Transcriber:
    """Whisper loaded once (on ``device``), transcribing batches of chunks.

    ``model``: ``tiny``, a hub id or a folder (:func:`resolve_asr_model`); ``max_new_tokens``
    caps each window's text (Whisper's own decoding cap is 224; a random model never ends on
    its own). Greedy decoding without Whisper's temperature fallback: what one batch gives
    is what one chunk alone gives."""

    def __init__(
        self,
        model: str = TINY,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 224,
    ):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device = torch.device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        path = resolve_asr_model(model)
        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
        self.model.to(self.device).eval()
        # The encoder keeps the attention it loaded with (sdpa): ``generate`` switches the
        # shared config to eager for the cross-attention weights the word times need.
        self._encoder_attn = self.model.config._attn_implementation
        tok = self.processor.tokenizer
        gen = self.model.generation_config
        self.eot = gen.eos_token_id
        self.lang_codes = {i: t.strip("<|>") for t, i in gen.lang_to_id.items()}
        self.timestamp_begin = gen.no_timestamps_token_id + 1
        # Only text and the end of text: no timestamp tokens (one pass per window, words
        # timed by DTW instead), no other special token.
        special = set(tok.all_special_ids) - {self.eot}
        self.suppress = sorted(
            set(gen.suppress_tokens or ()) | special | set(range(self.timestamp_begin, len(tok)))
        )
        self.feature_rate = self.processor.feature_extractor.sampling_rate

    @property
    def name(self) -> str:
        return self.model.config.name_or_path

    def transcribe(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> list[Transcript]:
        """Mono waveforms at ``sample_rate`` → one :class:`Transcript` each, batched
        ``batch_size`` windows at a time. Raises if any batch fails (see
        :meth:`transcribe_each` for one failure per chunk)."""
        rate = self.feature_rate
        wavs = [prepare(np.asarray(w, np.float32), sample_rate, rate) for w in waveforms]
        items: list[tuple[int, float, torch.Tensor]] = []  # (chunk, offset_s, window)
        for i, w in enumerate(wavs):
            for a, b in windows(len(w), self.feature_rate):
                items.append((i, a / self.feature_rate, w[a:b]))
        results: list[Transcript] = []
        for k in range(0, len(items), self.batch_size):
            results += self._run([w for _, _, w in items[k : k + self.batch_size]])
        words: list[list[dict]] = [[] for _ in wavs]
        language: list[str | None] = [None] * len(wavs)
        for (i, offset, _), res in zip(items, results, strict=True):
            language[i] = language[i] or res.language  # the first window's language
            words[i] += [
                {**w, "start_s": w["start_s"] + offset, "end_s": w["end_s"] + offset}
                for w in res.words
            ]
        return [
            Transcript(repair_times(ws, len(w) / self.feature_rate), lang)
            for ws, lang, w in zip(words, language, wavs, strict=True)
        ]

    def transcribe_each(
        self, waveforms: Sequence[np.ndarray], sample_rate: int
    ) -> list[Transcript | Exception]:
        """Like :meth:`transcribe`, but a batch that fails is retried one chunk at a time, so
        only the chunk at fault comes back as its exception."""
        try:
            return list(self.transcribe(waveforms, sample_rate))
        except Exception:  # noqa: BLE001 - isolate the chunk at fault below
            if len(waveforms) == 1:
                raise
        out: list[Transcript | Exception] = []
        for w in waveforms:
            try:
                out += self.transcribe([w], sample_rate)
            except Exception as exc:  # noqa: BLE001 - returned, recorded by the caller
                out.append(exc)
        return out

    @torch.inference_mode()
    def _run(self, wavs: list[torch.Tensor]) -> list[Transcript]:
        """One batch of windows (each <= 30 s, at Whisper's rate) through Whisper."""
        fe = self.processor.feature_extractor
        feats = fe(
            [w.numpy() for w in wavs],
            sampling_rate=self.feature_rate,
            return_attention_mask=True,
            return_tensors="pt",
            device=str(self.device),
        )
        features = feats.input_features.to(self.device, self.dtype)
        mask = feats.attention_mask.to(self.device)
        self.model.config._attn_implementation = self._encoder_attn
        encoded = self.model.get_encoder()(features)
        lang_ids = self.model.detect_language(encoder_outputs=encoded).tolist()
        languages = [self.lang_codes[i] for i in lang_ids]
        out = self.model.generate(
            encoder_outputs=encoded,
            attention_mask=mask,
            language=languages,
            task="transcribe",
            return_token_timestamps=True,
            max_new_tokens=self.max_new_tokens,
            suppress_tokens=self.suppress,
        )
        tok = self.processor.tokenizer
        results = []
        for seq, times, lang in zip(
            out["sequences"].tolist(), out["token_timestamps"].tolist(), languages, strict=True
        ):
            n = next((j for j, t in enumerate(seq) if t >= self.eot), len(seq))
            results.append(Transcript(words_from_tokens(tok, seq[:n], times[: n + 1], lang), lang))
        return results
