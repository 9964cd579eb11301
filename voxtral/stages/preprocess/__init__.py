"""Preprocess (stage 3): every chunk → codec codes and timed text ids, in ``tokens/``.

The Ray Data plan streams ``chunks/`` through three steps:

1. CPU tasks decode a window of chunks (FLAC → PCM at the codec rate), sort it by length
   and pack chunks of similar length into padded codec batches (int16 when that is exact),
   one row per batch. All the per-sample work happens here, on as many cores as there are.
2. An actor pool, each actor holding the codec once on its GPU (CPU when
   ``preprocess.num_gpus`` is 0), encodes one packed batch per call (a copy to the device
   and the codec call; nothing else) and trims each chunk back to its own frames.
   Before them, unless ``text.source=captions``, a pool of ASR actors (each holding Whisper
   once, :mod:`voxtral.asr`) transcribes the chunks that need it (``auto``: those without
   caption words; ``asr``: all) from the same packed PCM and adds their words and language.
3. CPU tasks pick each chunk's words (:func:`voxtral.words.choose_words`: Whisper's where
   it ran, else the captions), turn them into base-tokenizer ids at their times, write
   ``tokens/part-*.parquet`` atomically and record failures.

**Why a pool of its own for Whisper.** Whisper is many times the codec's work per second of
audio (large-v3-turbo: a 32-layer encoder over every 30 s window, then a decoder step per
token; EnCodec: a small convolutional encoder), and only the chunks without captions need
it. In the codec actors it would stall the codec for every batch holding such a chunk; as
its own pool each model keeps its own actors busy, each pool is sized (``text.*_actors``,
``text.num_gpus``: fractional GPUs put one ASR and one codec actor on a GPU) to its own
work, Ray Data's backpressure balances the two, and ``captions`` builds no pool at all.

**Batching does not change the codes** (both codecs are causal; see
:mod:`voxtral.codec.batching`, where the per-batch functions live).

**Coverage.** Each token row says where its words came from (``text_source``: ``captions``,
``asr``, ``none``); the summary and the dashboard report the share of audio seconds of each.

**Idempotent reruns.** A chunk is done when its id is in ``tokens/``: token files are
written whole (atomic rename or single PUT) and only after encoding, so a killed run leaves
nothing half-written, and a rerun reads only the chunk files that still hold pending chunks.
Failures are ``failures/preprocess/<chunk>.parquet`` rows; a rerun retries them until
``preprocess.max_attempts``, except audio that cannot be decoded (retrying changes nothing).
Run one preprocess job per ``storage.root`` at a time.

**Codec record.** ``tokens/_codec.json`` names the codec, its codebooks, rates and weights
(:class:`voxtral.codec.CodecInfo`, written by :func:`voxtral.codec.ensure_codec_record`).
A run with another codec on the same root is refused before any work, and training refuses
tokens made with another codec. The leading ``_`` is what Parquet readers (pyarrow, Ray
Data, DuckDB, pandas) skip, so ``tokens/`` opens as a dataset. Earlier runs wrote
``tokens/codec.json``: it is still read, and a preprocess rerun renames it.

**Two streams** (``tokenizer.streams: 2``, full duplex): each diarised chunk gives one
token row per main speaker, that speaker's track as ``codes`` and everyone else's as
``user_codes``, its words only the speaker's; a chunk without turns gets none (a permanent
``no_speakers`` failure). The same steps, with wider batches: see ``duplex``.

The package: ``steps`` (the inter-step schemas and the decode, codec and writer steps),
``duplex`` (the two-stream pieces of those steps), ``transcribe`` (the ASR step) and
``plan`` (the Ray Data plan, the summary).
"""

from voxtral.stages.preprocess.plan import (
    check_token_streams,
    done_chunk_ids,
    fit_actor_cpus,
    format_summary,
    pending_chunks,
    run_preprocess,
    summarize,
)
from voxtral.stages.preprocess.steps import (
    BATCHES,
    ENCODED,
    PERMANENT_REASONS,
    STAGE,
    ChunkEncoder,
    decode_batch,
    token_rows,
    write_batch,
)
from voxtral.stages.preprocess.transcribe import (
    ASR_ERROR,
    TRANSCRIBED,
    ChunkTranscriber,
    transcribe_row,
    with_pcm,
)

__all__ = [
    "check_token_streams",
    "ASR_ERROR",
    "BATCHES",
    "ENCODED",
    "PERMANENT_REASONS",
    "STAGE",
    "TRANSCRIBED",
    "ChunkEncoder",
    "ChunkTranscriber",
    "decode_batch",
    "done_chunk_ids",
    "fit_actor_cpus",
    "format_summary",
    "pending_chunks",
    "run_preprocess",
    "summarize",
    "token_rows",
    "transcribe_row",
    "with_pcm",
    "write_batch",
]
