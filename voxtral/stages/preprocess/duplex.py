"""Two-stream (full-duplex) pieces of the preprocess steps, ``tokenizer.streams: 2``.

Each diarised chunk becomes one example per main speaker (:func:`voxtral.tracks.duplex_examples`,
at most two): that speaker's track is the model stream, everyone else's the user stream.
The steps stay the same with a wider packed batch:

- decode (:func:`chunk_examples`, :func:`pack_chunks`): a packed batch holds, for its ``n``
  chunks and their ``m`` examples, ``n + 2m`` rows of PCM: the chunks' mixes first (what
  Whisper transcribes, once per chunk, as in the one-stream plan), then the ``m`` model
  tracks, then the ``m`` user tracks. ``example_chunk`` names each example's chunk (its
  index in the batch), ``model_speaker`` its speaker.
- codec (:func:`encode_examples`): one codec call on the ``2m`` track rows (model and user
  tracks stacked), so both streams of an example are encoded alike and together.
- write: one token row per example (``chunk_id`` stays the chunk's, so "done" tracking by
  chunk id holds), its words only the model speaker's (:func:`voxtral.tracks.words_of`).

A chunk without turns (diarisation ``off``/``failed``/``none``, or chunk files from before
diarisation) has no model speaker to name: it gets no token row and a ``no_speakers``
failure, permanent (its turns are what the scrape made; a rerun cannot change them).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import soundfile as sf
import torch

from voxtral.audio import AudioError, resample
from voxtral.codec.batching import as_pcm16, encode_group, pad_batch, plan_batches
from voxtral.codec.models import Codec
from voxtral.tracks import duplex_examples

NO_SPEAKERS = "no_speakers"
"""Reason of a chunk with no speaker turns: no duplex example can be made of it."""

Example = tuple[str, np.ndarray, np.ndarray]
"""(model speaker, model track, user track), PCM at the codec rate (int16 when exact)."""


def decode_channels(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → float32 ``[channels, n]`` at ``target_sr``, channels kept apart (the
    mono readers, :func:`voxtral.audio.flac_decode`, average them)."""
    try:
        wav, sr = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for corrupt data
        raise AudioError(f"cannot decode FLAC: {exc}") from exc
    if not wav.size:
        raise AudioError("audio is empty")
    return resample(torch.from_numpy(np.ascontiguousarray(wav.T)), sr, target_sr).numpy()


def _pcm(track: np.ndarray) -> np.ndarray:
    pcm = as_pcm16(track)
    return track.astype(np.float32) if pcm is None else pcm


def chunk_examples(row: dict, mix: np.ndarray, sample_rate: int) -> list[Example]:
    """A chunks row's duplex examples. ``mix`` is its mono PCM at the codec rate (what the
    one-stream path encodes); a channel-split stereo chunk (``channels`` 2) is decoded
    again with its channels kept, and its tracks are its channels exactly."""
    turns = row.get("turns") or []
    if not turns:
        return []
    if row.get("channels") == 2:
        wav = decode_channels(row["audio"], sample_rate)
        if wav.shape[0] != 2:
            raise AudioError(f"chunk says 2 channels, its FLAC has {wav.shape[0]}")
        wav = wav[:, : len(mix)]
    else:
        wav = mix.astype(np.float32) / np.float32(32768) if mix.dtype == np.int16 else mix
    found = duplex_examples(wav, sample_rate, turns, channels=row.get("channels") or 1, k=2)
    return [(ex.model_speaker, _pcm(ex.model_track), _pcm(ex.user_track)) for ex in found]


def pack_chunks(
    ok: Sequence[tuple[dict, np.ndarray, list[Example]]],
    batch_size: int,
    max_pad: float,
    hop: int,
) -> list[tuple[list[int], np.ndarray, list[int], list[str]]]:
    """Decoded chunks (meta, mix, examples) → per packed batch: the chunks' indices in
    ``ok``, the ``[n + 2m, width]`` PCM (mixes, model tracks, user tracks), each example's
    chunk (index in the batch) and speaker. Chunks are grouped whole (Whisper sees each
    mix once) by ``batch_size // 2``, so a codec call stays near ``2 × batch_size`` rows."""
    out = []
    for group in plan_batches([len(mix) for _, mix, _ in ok], max(1, batch_size // 2), max_pad):
        mixes = [ok[i][1] for i in group]
        where = [(j, ex) for j, i in enumerate(group) for ex in ok[i][2]]
        models = [ex[1] for _, ex in where]
        users = [ex[2] for _, ex in where]
        pcm = pad_batch([*mixes, *models, *users], hop)
        out.append((group, pcm, [j for j, _ in where], [ex[0] for _, ex in where]))
    return out


def encode_examples(
    codec: Codec,
    pcm: np.ndarray,
    samples: Sequence[int],
    example_chunk: Sequence[int],
    autocast: bool = False,
) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
    """A packed duplex batch's ``n + 2m`` rows → per example ``(model codes, user codes)``,
    or the exception of either track. One codec call on the ``2m`` track rows; a chunk
    whose examples do not all encode fails whole (its rows are written together or not at
    all, so "done" by chunk id means all its examples)."""
    n, m = len(samples), len(example_chunk)
    if not m:
        return []
    lengths = [samples[j] for j in example_chunk] * 2
    codes = encode_group(codec, pcm[n : n + 2 * m], lengths, autocast)
    out: list[tuple[np.ndarray, np.ndarray] | Exception] = []
    for e in range(m):
        model, user = codes[e], codes[m + e]
        bad = model if isinstance(model, Exception) else user
        out.append(bad if isinstance(bad, Exception) else (model, user))
    failed = {example_chunk[e]: r for e, r in enumerate(out) if isinstance(r, Exception)}
    return [failed.get(example_chunk[e], r) for e, r in enumerate(out)]
