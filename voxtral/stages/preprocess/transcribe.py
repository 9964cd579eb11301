"""The ASR step of the preprocess plan: Whisper's words for the chunks that need them.

An actor pool of its own between the decode tasks and the codec actors (see the package
docstring for why), reading the same packed PCM and passing it on uncopied.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from voxtral import schema
from voxtral.config import TextConfig
from voxtral.stages.preprocess.steps import BATCHES, METRICS
from voxtral.words import as_words, needs_asr

ASR_ERROR = "asr_error"
"""Reason of a chunk Whisper failed on (retried by reruns, like a codec error)."""

# ASR actors → codec actors: BATCHES plus, per chunk, Whisper's words and language (both
# null where Whisper did not run on the chunk).
TRANSCRIBED = pa.schema(
    [
        *BATCHES,
        ("asr_words", pa.list_(pa.list_(schema.WORD))),
        ("language", pa.list_(pa.string())),
    ]
)


def chunk_pcm(meta: dict, pcm: bytes) -> list[np.ndarray]:
    """A packed BATCHES row's PCM → each chunk's own float32 samples (no padding). The
    chunks' rows come first (a two-stream batch's example tracks follow them)."""
    n, width = len(meta["chunk_id"]), meta["width"]
    if not width:
        return [np.zeros(0, np.float32)] * n
    dtype = np.dtype(meta["dtype"])
    rows = np.frombuffer(pcm, dtype=dtype, count=n * width).reshape(n, width)
    scale = np.float32(1 / 32768) if dtype.kind == "i" else np.float32(1)
    return [rows[j, : meta["samples"][j]].astype(np.float32) * scale for j in range(n)]


def transcribe_row(transcriber, meta: dict, pcm: bytes, sample_rate: int, source: str) -> dict:
    """ASR step on one BATCHES row (``meta``: its columns but ``pcm``): Whisper on the
    chunks that need it (and decoded fine), in one batch; a chunk Whisper fails on gets an
    ``asr_error`` reason (its codes are still computed, but it gets no token row)."""
    n = len(meta["chunk_id"])
    out = {**meta, "asr_words": [None] * n, "language": [None] * n}
    out["reason"], out["error"] = list(meta["reason"]), list(meta["error"])
    todo = [
        j for j in range(n) if meta["reason"][j] is None and needs_asr(meta["captions"][j], source)
    ]
    if not todo:
        return out
    wavs = chunk_pcm(meta, pcm)
    results = transcriber.transcribe_each([wavs[j] for j in todo], sample_rate)
    for j, res in zip(todo, results, strict=True):
        if isinstance(res, Exception):
            reason = "out_of_memory" if isinstance(res, torch.cuda.OutOfMemoryError) else ASR_ERROR
            out["reason"][j], out["error"][j] = reason, f"{type(res).__name__}: {res}"
        else:
            out["asr_words"][j] = as_words(res.words)
            out["language"][j] = res.language
    return out


class ChunkTranscriber:
    """ASR actor: loads Whisper once (on its GPU when it has one) and adds Whisper's words to
    packed batches, one per call (:func:`transcribe_row`)."""

    def __init__(self, text: TextConfig, sample_rate: int):
        from voxtral.asr import Transcriber

        use_gpu = text.num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("text.num_gpus > 0 but this ASR actor sees no CUDA device")
        if not use_gpu:
            torch.set_num_threads(max(1, round(text.num_cpus)))
        self.source, self.sample_rate = text.source, sample_rate
        self.transcriber = Transcriber(
            text.asr_model,
            device="cuda" if use_gpu else "cpu",
            dtype=text.dtype,
            batch_size=text.batch_size,
            max_new_tokens=text.max_new_tokens,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for i in range(len(table)):
            row = table.slice(i, 1)
            meta = row.drop_columns(["pcm"]).to_pylist()[0]
            pcm = row["pcm"].chunk(0)[0].as_buffer() if meta["width"] else b""
            out = transcribe_row(self.transcriber, meta, pcm, self.sample_rate, self.source)
            seconds = sum(
                meta["samples"][j] / self.sample_rate
                for j, words in enumerate(out["asr_words"])
                if words is not None
            )
            METRICS.record("asr_seconds", seconds)
            rows.append(out)
        return with_pcm(rows, table["pcm"])


def with_pcm(rows: list[dict], pcm: pa.ChunkedArray) -> pa.Table:
    """TRANSCRIBED rows (all but ``pcm``) + the batches' ``pcm`` column, passed on uncopied."""
    meta = TRANSCRIBED.remove(TRANSCRIBED.get_field_index("pcm"))
    table = pa.Table.from_pylist(rows, schema=meta).append_column("pcm", pcm)
    return table.select(TRANSCRIBED.names).cast(TRANSCRIBED)
